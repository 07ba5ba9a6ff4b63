"""TRL's ``GRPOTrainer`` with ``CollapseTrainerCallback`` on 2 CPU processes (DDP, gloo):
``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m tests.scripts.trl_grpo_ddp <out>``.

``TokenEntropy`` logs every 2 steps; the run stops at step 3 (a checkpoint) and resumes from it to
step 4. Independently of the monitor, every rank records each step's float64 entropy sum and
token count over its completion tokens, from the backbone's hidden states and the head's weight
in the training forward (gradients on); rank 0 writes both, per run, to ``<out>/run<i>.json``."""

import gc
import json
import sys
from pathlib import Path

import torch
import trl
from transformers import TrainerCallback

from collapse_monitor import functional as F
from collapse_monitor import probes
from collapse_monitor.integrations.transformers import CollapseTrainerCallback
from tests.integrations.test_trl import CHARS, char_tokenizer, prompts_and_reward, tiny_lm

KEY = "collapse/entropy/entropy_mean"


class Reference(TrainerCallback):
    """This rank's float64 entropy sum and token count of each optimizer step."""

    def __init__(self, model):
        self.steps, self.now, self.labels = {}, [0.0, 0], None
        self.head = model.lm_head
        model.register_forward_pre_hook(self._labels, with_kwargs=True)
        model.model.register_forward_hook(self._states)

    def _labels(self, module, args, kwargs):
        self.labels = kwargs.get("labels") if module.training and torch.is_grad_enabled() else None

    def _states(self, module, args, output):
        if self.labels is None:
            return
        h = output.last_hidden_state.detach()[:, :-1].double()
        keep = self.labels[:, 1:] != -100
        ent = F.token_entropy(h @ self.head.weight.detach().double().T)
        self.now[0] += float(ent[keep].sum())
        self.now[1] += int(keep.sum())

    def on_step_end(self, args, state, control, **kwargs):
        self.steps[state.global_step] = list(self.now)
        self.now = [0.0, 0]


def train(out: Path, index: int, max_steps: int, resume: bool):
    tok = char_tokenizer()
    data, reward = prompts_and_reward()
    model = tiny_lm(len(CHARS) + 2)
    reference = Reference(model)
    callback = CollapseTrainerCallback(
        [probes.TokenEntropy("model", head="lm_head", tokens=None, name="entropy")],
        log_every_n_steps=2,
    )
    args = trl.GRPOConfig(
        output_dir=str(out / "out"), per_device_train_batch_size=4, num_generations=4,
        max_completion_length=6, max_steps=max_steps, logging_steps=1, learning_rate=1e-3,
        report_to=[], use_cpu=True, save_strategy="steps", save_steps=3, temperature=1.0,
        beta=0.0, seed=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
        callbacks=[callback, reference],
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=resume or None)
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, reference.steps)
    if trainer.is_world_process_zero():
        logs = {e["step"]: e[KEY] for e in trainer.state.log_history if KEY in e}
        with open(out / f"run{index}.json", "w") as f:
            json.dump({"logs": logs, "ranks": every}, f)
    torch.distributed.barrier()
    callback.close()
    del trainer
    gc.collect()


def main(out):
    torch.set_num_threads(1)
    out = Path(out)
    train(out, 0, max_steps=3, resume=False)
    train(out, 1, max_steps=4, resume=True)
    torch.distributed.barrier()  # neither rank tears the group down while the other works
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
