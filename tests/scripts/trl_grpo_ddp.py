"""TRL's ``GRPOTrainer`` or ``SFTTrainer`` with ``CollapseTrainerCallback`` on 2 CPU processes
(DDP, gloo): ``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m tests.scripts.trl_grpo_ddp
<out> grpo|sft``.

``TokenEntropy`` logs every 2 steps; the run stops at step 3 (a checkpoint) and resumes from it to
step 4. Independently of the monitor, every rank records each step's float64 entropy sum and
token count over its completion tokens, from the backbone's hidden states and the head's weight
in the training forward (gradients on); with GRPO also those of the rollouts (a rollout probe):
each step's generated completions rescored by a float64 copy of the weights that sampled them.
Rank 0 writes both, per run, to ``<out>/run<i>.json``."""

import gc
import json
import sys
from pathlib import Path

import datasets
import torch
import trl
from transformers import TrainerCallback

from collapse_monitor import functional as F
from collapse_monitor import probes
from collapse_monitor.integrations.transformers import CollapseTrainerCallback
from tests.integrations.test_trl import (
    CHARS,
    char_tokenizer,
    prompts_and_reward,
    rescore_rollouts,
    tiny_lm,
)

KEYS = (
    "collapse/entropy/entropy_mean",
    "collapse/rollout/entropy_mean",
    "collapse/rollout/tokens",
)


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


def train(out: Path, index: int, max_steps: int, resume: bool, kind: str):
    tok = char_tokenizer()
    model = tiny_lm(len(CHARS) + 2)
    reference = Reference(model)
    entropy = [
        probes.TokenEntropy("model", head="lm_head", tokens=None, name="entropy"),
        probes.TokenEntropy("model", head="lm_head", tokens=None, rollout=True, name="rollout"),
    ]
    common = dict(
        output_dir=str(out / "out"), per_device_train_batch_size=4, max_steps=max_steps,
        logging_steps=1, learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="steps",
        save_steps=3, seed=0, disable_tqdm=True,
    )  # fmt: skip
    rollouts: dict = {}
    if kind == "grpo":
        data, reward = prompts_and_reward()
        callback = CollapseTrainerCallback(entropy, log_every_n_steps=2)
        args = trl.GRPOConfig(
            num_generations=4, max_completion_length=6, temperature=1.0, beta=0.0, **common,
        )  # fmt: skip
        trainer = trl.GRPOTrainer(
            model=model, reward_funcs=reward, args=args, train_dataset=data,
            processing_class=tok, callbacks=[callback, reference],
        )  # fmt: skip
        rollouts = rescore_rollouts(trainer, model)
    else:  # prompt-completion pairs, right-padded: the loss covers the completions only
        tok.padding_side = "right"
        pairs = [("ab", "cde"), ("abcdef", "g"), ("a", "bcdefgh"), ("cdefghij", "aa")] * 8
        data = datasets.Dataset.from_dict(
            {"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs]}
        )
        callback = CollapseTrainerCallback(entropy, log_every_n_steps=2)
        trainer = trl.SFTTrainer(
            model=model, args=trl.SFTConfig(**common), train_dataset=data, processing_class=tok,
            callbacks=[callback, reference],
        )  # fmt: skip
    trainer.train(resume_from_checkpoint=resume or None)
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, [reference.steps, rollouts])
    if trainer.is_world_process_zero():
        logs = {
            key: {e["step"]: e[key] for e in trainer.state.log_history if key in e} for key in KEYS
        }
        with open(out / f"run{index}.json", "w") as f:
            json.dump({"logs": logs, "ranks": every}, f)
    torch.distributed.barrier()
    callback.close()
    del trainer
    gc.collect()


def main(out, kind):
    torch.set_num_threads(1)
    out = Path(out)
    train(out, 0, max_steps=3, resume=False, kind=kind)
    train(out, 1, max_steps=4, resume=True, kind=kind)
    torch.distributed.barrier()  # neither rank tears the group down while the other works
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
