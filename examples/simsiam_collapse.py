"""Dimensional collapse in SimSiam on the digits data set: the stop-gradient matters.

SimSiam (Chen & He 2021) is trained twice on augmented 8x8 digits: with the stop-gradient and
without it. The RepresentationRank probe on the projector output streams RankMe (Garrido et al.
2023), the effective rank, and SimSiam's own collapse signal, the std of L2-normalised embeddings
times sqrt(d) (~1 healthy, -> 0 collapsed). Without the stop-gradient the embeddings collapse to a
point within a few epochs; with it they do not.

    python examples/simsiam_collapse.py --out runs/simsiam
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn
from tqdm.auto import tqdm

from collapse_monitor import CollapseMonitor, probes
from collapse_monitor.integrations.tensorboard import TensorBoardSink

DIM = 64


def mlp(*sizes, last_bn=True):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=False))
        if i < len(sizes) - 2 or last_bn:
            layers.append(nn.BatchNorm1d(b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class SimSiam(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = mlp(64, 256, 256)
        self.projector = mlp(256, 256, DIM, last_bn=False)
        self.predictor = nn.Sequential(
            nn.Linear(DIM, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, DIM)
        )

    def forward(self, x):
        z = self.projector(self.backbone(x))
        return z, self.predictor(z)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to one pixel, pixel dropout and noise on (N, 64) images in [0, 1]."""
    img = x.view(-1, 8, 8)
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
    img = torch.roll(img, shifts=(dy, dx), dims=(1, 2))
    keep = (torch.rand(img.shape, generator=g) > 0.2).float()
    return (img * keep + 0.1 * torch.randn(img.shape, generator=g)).view(-1, 64)


def negative_cosine(p, z):
    return -nn.functional.cosine_similarity(p, z, dim=-1).mean()


def train(stop_gradient: bool, args, out: Path) -> dict:
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0
    model = SimSiam()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sink = TensorBoardSink(out)
    mon = CollapseMonitor(
        model,
        [probes.RepresentationRank("projector", ssl=True, name="proj")],
        log_every_n_steps=args.log_every,
        sinks=[sink],
        pictures=not args.no_pictures,
    )
    history = []
    for _ in tqdm(range(args.epochs), desc=out.name, unit="epoch", leave=False):
        for idx in torch.randperm(len(x), generator=g).split(args.batch_size):
            x1, x2 = augment(x[idx], g), augment(x[idx], g)
            with mon.observe():
                z1, p1 = model(x1)
                z2, p2 = model(x2)
            if stop_gradient:
                z1, z2 = z1.detach(), z2.detach()
            loss = (negative_cosine(p1, z2) + negative_cosine(p2, z1)) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            metrics = mon.step(optimizer=opt)
            if metrics is not None:
                history.append((mon.global_step, metrics, loss.item()))
    mon.close()
    _, final, loss = history[-1]
    return {
        "history": history,
        "rankme": final["collapse/proj/rankme"],
        "erank": final["collapse/proj/erank"],
        "norm_std": final["collapse/proj/norm_std"],
        "loss": loss,
    }


def plot(runs: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    panels = [
        ("norm_std", "std of z/|z| x sqrt(d)"),
        ("rankme", f"RankMe (max {DIM})"),
        ("erank", "effective rank (covariance)"),
    ]
    for label, run in runs.items():
        steps = [s for s, _, _ in run["history"]]
        for ax, (key, title) in zip(axes, panels):
            ax.plot(steps, [m[f"collapse/proj/{key}"] for _, m, _ in run["history"]], label=label)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    axes[0].axhline(0.5, color="gray", ls="--", lw=1)
    axes[0].legend()
    fig.suptitle(
        "SimSiam on digits: dimensional collapse without the stop-gradient (collapse-monitor)"
    )
    fig.savefig(png, dpi=90)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--log-every", type=int, default=7, help="steps per window (7 = one epoch)")
    parser.add_argument("--out", default="runs/simsiam")
    parser.add_argument("--png", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-pictures", action="store_true", help="no TensorBoard pictures (a render per log)"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    runs = {}
    for label, sg in (("with stop-gradient", True), ("without stop-gradient", False)):
        start = time.time()
        runs[label] = run = train(sg, args, out / ("stopgrad" if sg else "no_stopgrad"))
        print(
            f"{label:22s} norm_std {run['norm_std']:.3f}  RankMe {run['rankme']:5.1f}/{DIM}  "
            f"erank {run['erank']:5.1f}  loss {run['loss']:.3f}  ({time.time() - start:.0f}s)",
            flush=True,
        )
    png = Path(args.png) if args.png else out / "simsiam_collapse.png"
    plot(runs, png)
    print(f"logs: {out}  figure: {png}  view: tensorboard --logdir {out}")
    return runs


if __name__ == "__main__":
    main()
