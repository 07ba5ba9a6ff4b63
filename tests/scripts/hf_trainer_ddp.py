"""``transformers.Trainer`` with ``CollapseTrainerCallback`` on 2 CPU processes (DDP, gloo):
``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m tests.scripts.hf_trainer_ddp <out>
[shards|zero3]``. A tiny GPT-2 without dropout and a learning rate of 0: each logged window (one
epoch) is a fixed function of the whole data set, which the test computes in one process.
With ``shards``, the head's classes are sharded over the ranks (beside a replicated probe) and
the run stops at step 3 (a checkpoint) and resumes from it to step 4; with ``zero3`` DeepSpeed ZeRO-3 trains the model
(``DS_ACCELERATOR=cpu``)."""

import gc
import importlib
import json
import sys
from pathlib import Path

import torch
from transformers import Trainer

from collapse_monitor import probes
from collapse_monitor.integrations.transformers import CollapseTrainerCallback
from tests.integrations.test_transformers import Tokens, V, arguments, gpt2

ROWS = 32


def train(out, shards=False, resume=False, **kw):
    nc = probes.NeuralCollapse("lm_head", V, target_shift=1, ncc_max_rows=0, shard_classes=shards)
    watched = [nc]
    if shards:  # and the replicated statistics beside them
        watched.append(
            probes.NeuralCollapse("lm_head", V, target_shift=1, ncc_max_rows=0, name="replicated")
        )
    cb = CollapseTrainerCallback(watched, observe_every_n_steps=1)
    # 32 rows / (2 ranks x 4 rows x 2 micro-batches): 2 optimizer steps per epoch
    args = arguments(Path(out), learning_rate=0.0, logging_steps=2, **kw)
    trainer = Trainer(gpt2(dropout=0.0), args, train_dataset=Tokens(ROWS), callbacks=[cb])
    trainer.train(resume_from_checkpoint=resume or None)
    return [e for e in trainer.state.log_history if "collapse/lm_head/nc1" in e], trainer


def main(out, mode=None):
    torch.set_num_threads(1)
    if mode == "zero3":  # DeepSpeed ZeRO-3, every parameter partitioned
        # DeepSpeed's fallback to torch.distributed where its shared-memory all-reduce op is
        # not built (as off Linux): no 60 s compile of that op in every test run
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
        sizes = (
            "train_micro_batch_size_per_gpu",
            "train_batch_size",
            "gradient_accumulation_steps",
        )
        batch = dict.fromkeys(sizes, "auto")
        logs, trainer = train(out, max_steps=4, deepspeed={"zero_optimization": zero, **batch})
        head = trainer.model_wrapped.module.lm_head.weight  # (the engine's model)
        assert trainer.is_deepspeed_enabled and hasattr(head, "ds_id")
    elif mode == "shards":
        first, _ = train(out, True, max_steps=3, save_strategy="steps", save_steps=3)
        logs, trainer = train(out, True, resume=True, max_steps=4)
        logs = first + [e for e in logs if e["step"] > 3]
    else:
        logs, trainer = train(out, max_steps=4)
    if trainer.is_world_process_zero():
        with open(f"{out}/logs.json", "w") as f:
            json.dump(logs, f)
    torch.distributed.barrier()  # neither rank tears the group down while the other works
    # the DDP wrapper's Reducer goes while the group lives, then the group, on every rank (left
    # to interpreter exit, a rank aborted once: "terminate called without an active exception")
    del trainer
    gc.collect()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
