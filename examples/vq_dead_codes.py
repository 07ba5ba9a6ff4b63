"""Codebook collapse in a VQ-VAE on the digits data set, and the standard fix.

A small VQ-VAE (van den Oord et al. 2017) with a learned codebook is trained on the digits images
that scikit-learn ships: once only monitored, once with ``ResetDeadCodes``, which replaces codes
the EMA calls dead with encoder outputs of the current batch (SoundStream). Without it most of the
codebook is never used; with it usage stays near 100% and reconstructions are no worse. Then with
SimVQ's Gaussian codebook, plainly and with ``SimVQ`` (Zhu et al. 2024: the codebook becomes a
frozen basis times one learned linear layer, so every code follows the encoder): usage stays high
without a single reset.

    python examples/vq_dead_codes.py --out runs/vq
    tensorboard --logdir runs/vq
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn
from tqdm.auto import tqdm

from collapse_monitor import CollapseMonitor, mitigations, probes
from collapse_monitor.integrations.tensorboard import TensorBoardSink

TOKENS, DIM, CODES = 4, 8, 512  # each image is encoded as 4 code vectors of size 8


class Quantizer(nn.Module):
    """Nearest-code quantiser with a learned codebook; returns (quantized, indices, loss)."""

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25, init: str = "tiny") -> None:
        super().__init__()
        self.codebook = nn.Embedding(num_codes, dim)
        if init == "tiny":  # the original VQ-VAE initialisation: tiny codes, far from the data
            nn.init.uniform_(self.codebook.weight, -1.0 / num_codes, 1.0 / num_codes)
        else:  # SimVQ's basis: Gaussian codes of norm ~1 (vector-quantize-pytorch's SimVQ)
            nn.init.normal_(self.codebook.weight, std=dim**-0.5)
        self.beta = beta

    def forward(self, z: torch.Tensor):
        idx = torch.cdist(z.reshape(-1, z.shape[-1]), self.codebook.weight).argmin(-1)
        idx = idx.view(z.shape[:-1])
        q = self.codebook(idx)
        loss = (q - z.detach()).pow(2).mean() + self.beta * (z - q.detach()).pow(2).mean()
        return z + (q - z).detach(), idx, loss


class VQVAE(nn.Module):
    def __init__(self, init: str = "tiny") -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, TOKENS * DIM))
        self.quantizer = Quantizer(CODES, DIM, init=init)
        self.decoder = nn.Sequential(nn.Linear(TOKENS * DIM, 256), nn.ReLU(), nn.Linear(256, 64))

    def forward(self, x: torch.Tensor):
        q, idx, vq_loss = self.quantizer(self.encoder(x).view(-1, TOKENS, DIM))
        return self.decoder(q.flatten(1)), vq_loss


def digits(seed: int = 0):
    x = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[perm[297:]], x[perm[:297]]


# run: (codebook initialisation, mitigations)
RUNS = {
    "monitored only": ("tiny", lambda: []),
    "with ResetDeadCodes": ("tiny", lambda: [mitigations.ResetDeadCodes("quantizer")]),
    "Gaussian codebook": ("gaussian", lambda: []),
    "Gaussian codebook, SimVQ": ("gaussian", lambda: [mitigations.SimVQ("quantizer")]),
}


def train(label: str, args, out: Path) -> dict:
    torch.manual_seed(args.seed)
    x, x_test = digits(args.seed)
    init, fixes = RUNS[label]
    model = VQVAE(init)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sink = TensorBoardSink(out)
    mon = CollapseMonitor(
        model,
        [probes.CodebookUsage("quantizer", num_codes=CODES, name="vq")],
        log_every_n_steps=args.log_every,
        sinks=[sink],
        pictures=not args.no_pictures,
        mitigations=fixes(),
    )
    history = []
    for _ in tqdm(range(args.epochs), desc=out.name, unit="epoch", leave=False):
        for idx in torch.randperm(len(x)).split(args.batch_size):
            with mon.observe():
                recon, vq_loss = model(x[idx])
            loss = (recon - x[idx]).pow(2).mean() + vq_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            metrics = mon.step(optimizer=opt)
            if metrics is not None:
                with torch.no_grad():
                    test_mse = (model(x_test)[0] - x_test).pow(2).mean().item()
                sink.writer.add_scalar("test/reconstruction_mse", test_mse, mon.global_step)
                history.append((mon.global_step, metrics, test_mse))
    mon.close()
    step, final, test_mse = history[-1]
    return {
        "history": history,
        "usage": final["collapse/vq/usage"],
        "perplexity": final["collapse/vq/perplexity"],
        "test_mse": test_mse,
        "resets": final.get("collapse/mitigations/reset_dead_codes", 0.0),
    }


def plot(runs: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    panels = [
        ("usage", "codebook usage (fraction of codes hit per window)"),
        ("perplexity", f"perplexity (max {CODES})"),
        ("mse", "held-out reconstruction MSE"),
    ]
    for label, run in runs.items():
        steps = [s for s, _, _ in run["history"]]
        series = {
            "usage": [m["collapse/vq/usage"] for _, m, _ in run["history"]],
            "perplexity": [m["collapse/vq/perplexity"] for _, m, _ in run["history"]],
            "mse": [mse for _, _, mse in run["history"]],
        }
        for ax, (key, title) in zip(axes, panels):
            ax.plot(steps, series[key], label=label)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    axes[0].set_ylim(0, 1.02)
    axes[2].set_yscale("log")
    axes[0].legend()
    fig.suptitle("VQ-VAE on digits: codebook collapse, ResetDeadCodes and SimVQ (collapse-monitor)")
    fig.savefig(png, dpi=90)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--log-every", type=int, default=12, help="steps per window (12 = one epoch)"
    )
    parser.add_argument("--out", default="runs/vq")
    parser.add_argument(
        "--png", default=None, help="figure path (default: <out>/vq_dead_codes.png)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-pictures", action="store_true", help="no TensorBoard pictures (a render per log)"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    runs = {}
    for label in RUNS:
        start = time.time()
        runs[label] = run = train(label, args, out / label.replace(" ", "_").replace(",", ""))
        print(
            f"{label:26s} usage {run['usage']:6.1%}  perplexity {run['perplexity']:6.1f}/{CODES}  "
            f"held-out MSE {run['test_mse']:.4f}  codes reset {run['resets']:.0f}  "
            f"({time.time() - start:.0f}s)",
            flush=True,
        )
    png = Path(args.png) if args.png else out / "vq_dead_codes.png"
    plot(runs, png)
    print(f"logs: {out}  figure: {png}  view: tensorboard --logdir {out}")
    return runs


if __name__ == "__main__":
    main()
