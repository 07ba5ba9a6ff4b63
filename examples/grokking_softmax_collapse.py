"""Softmax collapse on modular addition (Prieto et al. 2025, "Grokking at the edge of numerical
stability"), and StableMax against it.

An MLP learns ``(a + b) mod p`` from 40% of all pairs, full batch, Adam without weight decay, in
float32. With the usual softmax cross-entropy it memorises the training set, then keeps scaling
its logits along the naive-loss-minimisation direction until the softmax saturates: every
non-maximal ``exp`` underflows, the gradient of those samples is exactly zero and test accuracy
stalls. The LogitHealth probe measures that fraction (``softmax_collapse``, tested in float32, the
training dtype). The same run with ``collapse_monitor.losses.stablemax_cross_entropy`` does not collapse (the
probe, with ``loss="stablemax"``, tests StableMax's own saturation). The modulus is 53 (the paper
uses 113) and Adam's beta2 is 0.9 so that both runs take seconds on 2 CPU cores.

    python examples/grokking_softmax_collapse.py --out runs/grokking
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from collapse_monitor import CollapseMonitor, losses, probes
from collapse_monitor.integrations.tensorboard import TensorBoardSink


def modular_addition(p: int, train_fraction: float, seed: int):
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    x = torch.cat([F.one_hot(a.flatten(), p), F.one_hot(b.flatten(), p)], 1).float()
    y = (a + b).flatten() % p
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    cut = int(train_fraction * p * p)
    return (x[perm[:cut]], y[perm[:cut]]), (x[perm[cut:]], y[perm[cut:]])


def make_model(p: int, width: int) -> nn.Module:
    model = nn.Sequential()
    model.add_module(
        "hidden",
        nn.Sequential(nn.Linear(2 * p, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()),
    )
    model.add_module("head", nn.Linear(width, p))
    return model


def train(loss_name: str, args, out: Path) -> dict:
    torch.manual_seed(args.seed)
    (x, y), (x_test, y_test) = modular_addition(args.p, args.train_fraction, args.seed)
    model = make_model(args.p, args.width)
    # no weight decay; a short second-moment memory (beta2) keeps Adam's steps from shrinking as the
    # gradients decay after memorisation, which brings the collapse within a CPU budget
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, args.beta2))
    sink = TensorBoardSink(out)
    mon = CollapseMonitor(
        model,
        [probes.LogitHealth("head", name="logits", loss=loss_name)],
        log_every_n_steps=args.log_every,
        sinks=[sink],
        pictures=not args.no_pictures,
    )
    history = []
    for _ in tqdm(range(args.steps), desc=out.name, unit="step", leave=False):
        with mon.observe(targets=y):
            logits = model(x)
        if loss_name == "softmax":
            loss = F.cross_entropy(logits, y)
        else:
            loss = losses.stablemax_cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        metrics = mon.step(optimizer=opt)
        if metrics is not None:
            with torch.no_grad():
                train_acc = (logits.argmax(1) == y).float().mean().item()
                test_acc = (model(x_test).argmax(1) == y_test).float().mean().item()
            sink.writer.add_scalar("accuracy/train", train_acc, mon.global_step)
            sink.writer.add_scalar("accuracy/test", test_acc, mon.global_step)
            history.append((mon.global_step, metrics, train_acc, test_acc))
    mon.close()
    _, final, train_acc, test_acc = history[-1]
    return {
        "history": history,
        "softmax_collapse": final["collapse/logits/softmax_collapse"],
        "train_acc": train_acc,
        "test_acc": test_acc,
        "log_z_mean": final["collapse/logits/log_z_mean"],
    }


def plot(runs: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    for label, run in runs.items():
        steps = [s for s, *_ in run["history"]]
        axes[0].plot(
            steps,
            [m["collapse/logits/softmax_collapse"] for _, m, _, _ in run["history"]],
            label=label,
        )
        axes[1].plot(
            steps, [m["collapse/logits/log_z_mean"] for _, m, _, _ in run["history"]], label=label
        )
        axes[2].plot(steps, [a for *_, a in run["history"]], label=f"{label}: test")
        axes[2].plot(steps, [a for _, _, a, _ in run["history"]], ":", label=f"{label}: train")
    titles = (
        "collapse of the training normaliser (fraction of samples)",
        "mean log Z (output-logit drift)",
        "accuracy",
    )
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.02, 1.02)
    axes[1].set_yscale("symlog")
    axes[0].legend()
    axes[2].legend(fontsize=7)
    fig.suptitle(
        "Modular addition without weight decay, float32: softmax collapse vs StableMax (collapse-monitor)"
    )
    fig.savefig(png, dpi=90)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p", type=int, default=53)
    parser.add_argument("--train-fraction", type=float, default=0.4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--beta2", type=float, default=0.9)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--out", default="runs/grokking")
    parser.add_argument("--png", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-pictures", action="store_true", help="no TensorBoard pictures (a render per log)"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    runs = {}
    for label in ("softmax", "stablemax"):
        start = time.time()
        runs[label] = run = train(label, args, out / label)
        print(
            f"{label:10s} softmax collapse {run['softmax_collapse']:.2f}  train acc {run['train_acc']:.3f}  "
            f"test acc {run['test_acc']:.3f}  log Z {run['log_z_mean']:.1f}  ({time.time() - start:.0f}s)",
            flush=True,
        )
    png = Path(args.png) if args.png else out / "grokking_softmax_collapse.png"
    plot(runs, png)
    print(f"logs: {out}  figure: {png}  view: tensorboard --logdir {out}")
    return runs


if __name__ == "__main__":
    main()
