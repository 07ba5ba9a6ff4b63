"""Attention entropy collapse in a small causal transformer, and σReparam against it.

A character-level transformer is trained on real English text that ships with Python
(``pydoc_data.topics``) with Adam at a learning rate high enough that the attention of its layers
collapses onto single keys (Zhai et al. 2023) and the loss stalls or spikes. The same run with
``mitigations.SigmaReparam`` on the attention projections (applied at start: ``W -> gamma W /
sigma(W)``, function-preserving) keeps entropy up and trains. The AttentionEntropy probe watches
the fused ``scaled_dot_product_attention`` calls without materialising attention matrices.

    python examples/attention_entropy_collapse.py --out runs/attention
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from pydoc_data.topics import topics

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from collapse_monitor import CollapseMonitor, mitigations, probes
from collapse_monitor.integrations.tensorboard import TensorBoardSink


def corpus() -> tuple[torch.Tensor, int]:
    text = "\n".join(topics[k] for k in sorted(topics))
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text[:400_000]], dtype=torch.long)
    return ids, len(chars)


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), Attention(d, heads)
        self.ln2, self.mlp = (
            nn.LayerNorm(d),
            nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)),
        )

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    def __init__(
        self, vocab: int, d: int = 64, heads: int = 4, layers: int = 2, context: int = 64
    ) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        return self.head(self.ln(self.blocks(x)))


def train(reparam: bool, args, data: torch.Tensor, vocab: int, out: Path) -> dict:
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    model = CharTransformer(vocab, context=args.context)
    sink = TensorBoardSink(out)
    mon = CollapseMonitor(
        model,
        [probes.AttentionEntropy("blocks.*.attn", name="attn")],
        log_every_n_steps=args.log_every,
        sinks=[sink],
        pictures=not args.no_pictures,
        mitigations=[mitigations.SigmaReparam("blocks.*.attn")] if reparam else [],
    )
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)  # built after σReparam: gammas included
    history = []
    for _ in tqdm(range(args.steps), desc=out.name, unit="step", leave=False):
        starts = torch.randint(0, len(data) - args.context - 1, (args.batch_size,), generator=g)
        x = torch.stack([data[s : s + args.context] for s in starts])
        y = torch.stack([data[s + 1 : s + args.context + 1] for s in starts])
        with mon.observe():
            logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        metrics = mon.step(optimizer=opt)
        if metrics is not None:
            sink.writer.add_scalar("train/loss", loss.item(), mon.global_step)
            history.append((mon.global_step, metrics, loss.item()))
    mon.close()
    _, final, loss = history[-1]
    return {
        "history": history,
        "loss": loss,
        "min_entropy_norm": final["collapse/attn/min_entropy_norm"],
        "min_over_run": min(m["collapse/attn/min_entropy_norm"] for _, m, _ in history),
        "max_logit": max(v for k, v in final.items() if k.endswith("max_logit")),
    }


def plot(runs: dict, png: Path, layers: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    for (label, run), style in zip(runs.items(), ("-", "--")):
        steps = [s for s, _, _ in run["history"]]
        for layer in range(layers):
            key = f"collapse/attn/blocks.{layer}.attn/entropy_norm"
            axes[0].plot(
                steps,
                [m[key] for _, m, _ in run["history"]],
                style,
                label=f"{label}, layer {layer}",
            )
            key = f"collapse/attn/blocks.{layer}.attn/max_logit"
            axes[1].plot(
                steps,
                [m[key] for _, m, _ in run["history"]],
                style,
                label=f"{label}, layer {layer}",
            )
        axes[2].plot(steps, [loss for _, _, loss in run["history"]], style, label=label)
    for ax, title in zip(
        axes,
        ("normalised attention entropy (mean over heads)", "max attention logit", "training loss"),
    ):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=8)
    fig.suptitle(
        "Char transformer on pydoc text at a high learning rate: entropy collapse and σReparam (collapse-monitor)"
    )
    fig.savefig(png, dpi=90)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=5e-2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--out", default="runs/attention")
    parser.add_argument("--png", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-pictures", action="store_true", help="no TensorBoard pictures (a render per log)"
    )
    args = parser.parse_args(argv)
    data, vocab = corpus()
    out = Path(args.out)
    runs = {}
    for label, reparam in (("plain", False), ("σReparam", True)):
        start = time.time()
        runs[label] = run = train(
            reparam, args, data, vocab, out / ("sigma_reparam" if reparam else "plain")
        )
        print(
            f"{label:9s} final loss {run['loss']:.3f}  min normalised entropy {run['min_entropy_norm']:.3f} "
            f"(lowest {run['min_over_run']:.3f})  max attention logit {run['max_logit']:.0f}  "
            f"({time.time() - start:.0f}s)",
            flush=True,
        )
    png = Path(args.png) if args.png else out / "attention_entropy_collapse.png"
    plot(runs, png, layers=2)
    print(f"logs: {out}  figure: {png}  view: tensorboard --logdir {out}")
    return runs


if __name__ == "__main__":
    main()
