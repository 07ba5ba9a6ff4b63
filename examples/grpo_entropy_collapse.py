"""Policy-entropy collapse in GRPO, seen by TokenEntropy and GenerationDiversity (TRL).

A tiny Llama built from a config (a character vocabulary, no download) learns with TRL's
``GRPOTrainer`` to complete random prompts with 8 characters, rewarded by their share of the
letter ``a``. Without an entropy bonus the policy sharpens onto one completion within about 25
steps: the entropy of its next-token distribution falls towards 0, the 4 completions of each
prompt become identical, their advantages zero (no gradient) and the reward stalls at 0.53 until
Adam's momentum carries the weights out around step 60. With TRL's entropy bonus
(``entropy_coef=0.2``) the same run keeps its entropy. The monitor reads the policy's entropy on
the completion tokens from the hidden states (TRL's fused LM head never materialises the
logits), the covariance of the sampled tokens' log-probability with their advantage (Cui et al.
2025; positive, 0.1-0.3, while the entropy falls, and held up by the bonus in the twin), and each
group's diversity and share of zero-advantage groups. ``TokenEntropy``'s default rule
(``policy_entropy_collapse``: the mean entropy, at 95% confidence, below 0.2 nats and below a
fifth of its highest window) alerts on the collapse; nothing else is configured. It runs in about 10 seconds.

    python examples/grpo_entropy_collapse.py --out runs/grpo
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from collapse_monitor import probes
from collapse_monitor.integrations.transformers import CollapseTrainerCallback

CHARS = "abcdefghij"
KEYS = {
    "entropy": "collapse/entropy/entropy_mean",
    "cov": "collapse/entropy/logprob_advantage_cov",
    "identical": "collapse/diversity/identical_fraction",
    "zero_adv": "collapse/diversity/zero_advantage_fraction",
}


def tokenizer():
    """A character tokenizer built in code: pad 0, end 1, then the letters."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    chars = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    chars.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=chars, pad_token="<pad>", eos_token="</s>", padding_side="left"
    )


def train(bonus: float, args, out: Path) -> dict:
    import datasets
    import transformers
    import trl

    g = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(1, 6, (512,), generator=g).tolist()
    prompts = [
        "".join(CHARS[int(i)] for i in torch.randint(0, 10, (k,), generator=g)) for k in lengths
    ]
    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(
        vocab_size=len(CHARS) + 2, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    alerts = []
    callback = CollapseTrainerCallback(
        [
            probes.TokenEntropy("model", head="lm_head", name="entropy"),
            probes.GenerationDiversity("", group_size=4, name="diversity"),
        ],
        log_every_n_steps=5,
        on_alert=alerts.append,
    )
    config_args = trl.GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=8, num_generations=4,
        max_completion_length=8, max_steps=args.steps, logging_steps=5, learning_rate=args.lr,
        lr_scheduler_type="constant", beta=0.0, entropy_coef=bonus, report_to=["tensorboard"],
        use_cpu=True, save_strategy="no", seed=args.seed, disable_tqdm=True,
    )  # fmt: skip
    trainer = trl.GRPOTrainer(
        model=transformers.LlamaForCausalLM(config),
        reward_funcs=lambda completions, **kw: [c.count("a") / max(len(c), 1) for c in completions],
        args=config_args,
        train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer(),
        callbacks=[callback],
    )
    callback.observe_loss_inputs(trainer, advantages="advantages")
    trainer.train()
    callback.close()
    history = trainer.state.log_history
    series = {name: {e["step"]: e[key] for e in history if key in e} for name, key in KEYS.items()}
    series["reward"] = {e["step"]: e["reward"] for e in history if "reward" in e}
    series["alerts"] = [(a.step, a.rule) for a in alerts]
    return series


def plot(runs: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    panels = (
        ("entropy", "mean token entropy (nats)"),
        ("identical", "identical completions per group"),
        ("reward", "reward (share of 'a')"),
    )
    for ax, (key, title) in zip(axes, panels):
        for label, run in runs.items():
            steps = sorted(run[key])
            ax.plot(steps, [run[key][s] for s in steps], label=label)
            if key == "entropy":
                for step, _ in run["alerts"][:1]:
                    ax.axvline(step, ls="--", color="C3", lw=1)
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].axhline(0.2, ls=":", color="grey")
    axes[0].legend()
    fig.suptitle("GRPO: policy-entropy collapse (dashed: the policy_entropy_collapse alert)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/grpo")
    parser.add_argument("--png", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    runs = {}
    for label, bonus in (("no bonus", 0.0), ("entropy bonus 0.2", 0.2)):
        runs[label] = run = train(bonus, args, out / label.replace(" ", "_"))
        low, stalled = min(run["entropy"].values()), max(run["zero_adv"].values())
        print(
            f"{label:18s} lowest entropy {low:.3f} nats, most zero-advantage groups "
            f"{stalled:.0%}, alerts {run['alerts']}",
            flush=True,
        )
    png = Path(args.png) if args.png else out / "grpo_entropy_collapse.png"
    plot(runs, png)
    print(f"logs: {out}  figure: {png}  view: tensorboard --logdir {out}")
    return runs


if __name__ == "__main__":
    main()
