"""The post-training half of the detection zoo (benchmarks/detection.py runs and writes it):
policy-entropy collapse in GRPO against healthy twins.

A tiny Llama built from a config (a character vocabulary of 12: ten letters, padding, end of
sequence) is trained with TRL's ``GRPOTrainer`` on a synthetic verifiable task: completions of
up to ``L`` characters for random prompts of 1-5 letters, rewarded by their share of one letter.
The collapsing twin trains with a learning rate at which the policy commits to one completion;
its healthy twin differs only in an entropy bonus (``entropy_coef``) or a KL anchor (``beta``).
Both are monitored by ``TokenEntropy`` (on the hidden states of TRL's fused head) and
``GenerationDiversity`` with their **default rules only** through ``CollapseTrainerCallback``
(``log_every_n_steps = 5``).

Ground truth, independently of the monitor, every 5 steps: the mean next-token entropy of the
policy at the positions it generates for 64 held-out prompts (sampled at temperature 1, up to
the first end of sequence), in float64; onset: below 0.1 nats (the top token holds about 99% of
the probability). A run whose truth stays above 0.2 nats (the rule's bound) is healthy: an alert
there is a false alarm; one whose lowest truth lies between the two is near collapse, where an
alert is neither required nor false (counted apart). Reward plateau: the first log from which
TRL's mean reward stays within 0.02 for 20 steps (a collapsed policy's reward is flat; a
learning one's moves). Lead = plateau - first alert.

    python benchmarks/detection.py --only grpo_bonus,grpo_kl,grpo_fast,grpo_long,grpo_beta,grpo_wide,grpo_rmsprop
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))  # the example's character tokenizer
LOG_EVERY = 5
ONSET = 0.1  # nats
HEALTHY = 0.2  # nats: the rule's bound; a run whose truth stays above it must not alert
HELD_OUT_PROMPTS = 64
PLATEAU_LOGS = 4  # a reward flat for 4 logs (20 steps) has plateaued
LETTERS = "abcdefghij"


@dataclass(frozen=True)
class Pair:
    """Twins on one task: ``lr`` for both, ``healthy`` the twin's one difference."""

    lr: float
    healthy: dict  # GRPOConfig fields of the healthy twin: entropy_coef or beta
    letter: str = "a"
    group: int = 4  # completions per prompt (G)
    length: int = 8  # longest completion
    layers: int = 1
    steps: int = 200
    half: str = "calibration"
    optim: str = "adamw_torch_fused"  # TRL's default

    def describe(self) -> str:
        fix = ", ".join(f"`{k}={v}`" for k, v in self.healthy.items())
        return (
            f"reward: share of '{self.letter}', G = {self.group}, completions <= {self.length}, "
            f"{self.layers} layer(s), {self.optim} at learning rate {self.lr:g}, {self.steps} "
            f"steps; healthy twin: {fix}"
        )


PAIRS = {
    # the twins the rule was set on (with other learning rates and bonuses, not tabled)
    "grpo_bonus": Pair(5e-3, {"entropy_coef": 0.1}),
    # held out in the first round; a false alarm there on grpo_kl's healthy twin (seed 1: a
    # window of 52 tokens read 0.196 nats, the policy held 0.23) moved the rule onto the upper
    # bound of the policy's mean, so they are calibration runs now
    "grpo_kl": Pair(5e-3, {"beta": 0.1}, "b", 8, 12, 2),
    "grpo_fast": Pair(1e-2, {"entropy_coef": 0.2}, "c"),
    # built after that change, run once
    "grpo_long": Pair(
        3e-3, {"entropy_coef": 0.05}, "d", 6, 16, 2, half="held-out", optim="adamw_torch"
    ),
    "grpo_beta": Pair(7e-3, {"beta": 0.2}, "e", 4, 10, half="held-out", optim="adamw_torch"),
    "grpo_wide": Pair(
        4e-3, {"entropy_coef": 0.15}, "g", 12, 6, half="held-out", optim="adamw_torch"
    ),
    "grpo_rmsprop": Pair(2e-3, {"beta": 0.05}, "h", 4, 8, half="held-out", optim="rmsprop"),
}


def run(name: str, collapse: bool, seed: int) -> dict:
    """One GRPO run of ``PAIRS[name]``: its alerts, ground truth and rewards."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)
    import datasets
    import transformers
    import trl
    from grpo_entropy_collapse import tokenizer

    from collapse_monitor import functional, probes
    from collapse_monitor.integrations.transformers import CollapseTrainerCallback

    pair = PAIRS[name]
    tok = tokenizer()
    g = torch.Generator().manual_seed(seed)

    def prompts(n: int) -> list[str]:
        lengths = torch.randint(1, 6, (n,), generator=g).tolist()
        return [
            "".join(LETTERS[i] for i in torch.randint(0, 10, (k,), generator=g)) for k in lengths
        ]

    train = datasets.Dataset.from_dict({"prompt": prompts(2048)})
    held = tok(prompts(HELD_OUT_PROMPTS), return_tensors="pt", padding=True)

    def reward(completions, **kw):
        return [c.count(pair.letter) / max(len(c), 1) for c in completions]

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=pair.layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=1,
        )
    )
    truth: dict[int, float] = {}

    class Truth(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % LOG_EVERY:
                return
            was = model.training
            model.eval()
            with torch.no_grad():
                out = model.generate(
                    **held, do_sample=True, max_new_tokens=pair.length, temperature=1.0,
                    top_k=0, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                )  # fmt: skip
            z = torch.stack(out.logits, 1).double()  # (prompts, new tokens, V)
            new = out.sequences[:, held["input_ids"].shape[1] :]
            alive = torch.ones_like(new, dtype=torch.bool)  # up to the first end of sequence
            alive[:, 1:] = (new[:, :-1] != tok.eos_token_id).cumprod(1).bool()
            truth[state.global_step] = functional.token_entropy(z)[alive].mean().item()
            model.train(was)

    alerts = []
    cb = CollapseTrainerCallback(
        [
            probes.TokenEntropy("model", head="lm_head", name="entropy"),
            probes.GenerationDiversity("", group_size=pair.group, name="diversity"),
        ],
        log_every_n_steps=LOG_EVERY,
        on_alert=alerts.append,
    )
    with tempfile.TemporaryDirectory() as out:
        fields = {"beta": 0.0, **({} if collapse else pair.healthy)}
        policy = model
        if fields.get("beta"):  # TRL loads the reference model by its path
            model.save_pretrained(f"{out}/init")
            policy = f"{out}/init"
        args = trl.GRPOConfig(
            output_dir=out, per_device_train_batch_size=2 * pair.group,
            num_generations=pair.group, max_completion_length=pair.length,
            max_steps=pair.steps, logging_steps=LOG_EVERY, learning_rate=pair.lr,
            lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no",
            seed=seed, temperature=1.0, disable_tqdm=True, log_level="error", optim=pair.optim,
            **fields,
        )  # fmt: skip
        trainer = trl.GRPOTrainer(
            model=policy, reward_funcs=reward, args=args, train_dataset=train,
            processing_class=tok, callbacks=[cb, Truth()],
        )  # fmt: skip
        trainer.remove_callback(transformers.PrinterCallback)
        trainer.remove_callback(transformers.ProgressCallback)
        cb.observe_loss_inputs(trainer, advantages="advantages")
        trainer.train()
        cb.close()
        rewards = {e["step"]: e["reward"] for e in trainer.state.log_history if "reward" in e}
    mine = [a for a in alerts if a.rule.startswith(("entropy/", "diversity/"))]
    onset = next((s for s, v in sorted(truth.items()) if v < ONSET), None)
    logs = sorted(rewards)
    flat = [  # the reward stops moving: within 0.02 over the next PLATEAU_LOGS logs
        s
        for i, s in enumerate(logs[: len(logs) - PLATEAU_LOGS])
        if max(rewards[t] for t in logs[i : i + PLATEAU_LOGS + 1])
        - min(rewards[t] for t in logs[i : i + PLATEAU_LOGS + 1])
        <= 0.02
    ]
    plateau = flat[0] if flat else None
    return {
        "name": name,
        "half": pair.half,
        "collapse": collapse,
        "seed": seed,
        "first_alert": min((a.step for a in mine), default=None),
        "rule": min(mine, key=lambda a: a.step).rule if mine else "",
        "alerts": sorted({a.rule for a in mine}),
        "onset": onset,
        "lowest": min(truth.values()),
        "plateau": plateau,
        "reward": rewards[logs[-1]],
    }


def table(results: list[dict]) -> list[str]:
    lines = [
        "| twins | twin | seed | first alert (rule) | truth onset | lowest truth (nats) | "
        "reward plateau | lead | final reward |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        twin = "collapsing" if r["collapse"] else "healthy"
        alert = f"{r['first_alert']} ({r['rule']})" if r["rule"] else "-"
        both = r["first_alert"] is not None and r["plateau"] is not None
        lead = r["plateau"] - r["first_alert"] if both else "-"
        lines.append(
            f"| {r['name']} | {twin} | {r['seed']} | {alert} | {r['onset'] or '-'} | "
            f"{r['lowest']:.3f} | {r['plateau'] or '-'} | {lead} | {r['reward']:.2f} |"
        )
    return lines


def summary(results: list[dict]) -> list[str]:
    """Judged by the ground truth, whichever twin a run is: an alert on a run whose truth never
    fell below the rule's own bound (``HEALTHY``) is a false alarm; a run that reached the
    onset must be alerted by then; one whose lowest truth lies between the two fell under the
    rule's bound without reaching the onset: near collapse, where an alert is neither required
    nor false (counted apart)."""
    reached = [r for r in results if r["onset"] is not None]
    healthy = [r for r in results if r["lowest"] >= HEALTHY]
    near = [r for r in results if r["onset"] is None and r["lowest"] < HEALTHY]
    false = [r for r in healthy if r["first_alert"] is not None]
    late = [r for r in reached if r["first_alert"] is None or r["first_alert"] > r["onset"]]
    healthy_down = [r for r in reached if not r["collapse"]]
    leads = [
        r["plateau"] - r["first_alert"]
        for r in reached
        if r["first_alert"] is not None and r["plateau"] is not None
    ]
    onset_leads = [r["onset"] - r["first_alert"] for r in reached if r["first_alert"] is not None]

    def named(runs: list[dict]) -> str:
        return ", ".join(f"{r['name']} {'collapsing' if r['collapse'] else 'healthy'} seed "
                         f"{r['seed']} (lowest {r['lowest']:.3f})" for r in runs) or "none"  # fmt: skip

    alerted_near = [r for r in near if r["first_alert"] is not None]
    return [
        f"Runs whose ground truth stayed above {HEALTHY} nats: {len(healthy)}, alerted: "
        f"{len(false)} ({named(false)}). Runs that reached the onset ({ONSET} nats): "
        f"{len(reached)} ({len(healthy_down)} of them healthy twins); alerted after the onset "
        f"or never: {len(late)}. Near collapse (lowest between {ONSET} and {HEALTHY}): "
        f"{len(near)}, alerted: {len(alerted_near)} ({named(alerted_near)}). Alert before the "
        f"onset by {', '.join(map(str, onset_leads)) or '-'} steps; before the reward plateau "
        f"by {', '.join(map(str, leads)) or '-'} steps."
    ]
