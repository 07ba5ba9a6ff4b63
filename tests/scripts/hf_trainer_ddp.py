"""``transformers.Trainer`` with ``CollapseTrainerCallback`` on 2 CPU processes (DDP, gloo):
``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m tests.scripts.hf_trainer_ddp <out>``.
A tiny GPT-2 without dropout and a learning rate of 0: each logged window (one epoch) is a
fixed function of the whole data set, which the test computes in one process."""

import json
import sys
from pathlib import Path

import torch
from transformers import Trainer

from collapse_monitor import probes
from collapse_monitor.integrations.transformers import CollapseTrainerCallback
from tests.integrations.test_transformers import Tokens, V, arguments, gpt2

ROWS = 32


def main(out):
    torch.set_num_threads(1)
    nc = probes.NeuralCollapse("lm_head", V, target_shift=1, ncc_max_rows=0)
    cb = CollapseTrainerCallback([nc], observe_every_n_steps=1)
    # 32 rows / (2 ranks x 4 rows x 2 micro-batches): 2 optimizer steps per epoch
    args = arguments(Path(out), max_steps=4, learning_rate=0.0, logging_steps=2)
    trainer = Trainer(gpt2(dropout=0.0), args, train_dataset=Tokens(ROWS), callbacks=[cb])
    trainer.train()
    if trainer.is_world_process_zero():
        logs = [e for e in trainer.state.log_history if "collapse/lm_head/nc1" in e]
        with open(f"{out}/logs.json", "w") as f:
            json.dump(logs, f)


if __name__ == "__main__":
    main(sys.argv[1])
