"""Posterior collapse in a VAE on the digits data set, and free bits against it.

A VAE with 16 latent dimensions is trained twice with a strong KL weight (beta = 4): once plainly,
once with free bits (Kingma et al. 2016: each dimension's KL below ``lambda`` nats is not
penalised). The monitor's PosteriorCollapse probe counts active units (Burda et al.: Var_x(mu_j) >
0.01) and the KL per dimension; plain training lets most units collapse to the prior, free bits
keeps them active.

    python examples/vae_posterior_collapse.py --out runs/vae
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

LATENT = 16


class Posterior(nn.Module):
    """Diagonal Gaussian posterior head: returns ``(mu, logvar)``."""

    def __init__(self, width: int, latent: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, 2 * latent)

    def forward(self, h):
        mu, logvar = self.linear(h).chunk(2, dim=-1)
        return mu, logvar


class VAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU())
        self.posterior = Posterior(128, LATENT)
        self.decoder = nn.Sequential(
            nn.Linear(LATENT, 128), nn.ReLU(), nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64)
        )

    def forward(self, x):
        mu, logvar = self.posterior(self.encoder(x))
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
        return self.decoder(z), mu, logvar


def digits(seed: int = 0):
    x = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[perm[297:]], x[perm[:297]]


def train(free_bits: float, args, out: Path) -> dict:
    torch.manual_seed(args.seed)
    x, x_test = digits(args.seed)
    model = VAE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sink = TensorBoardSink(out)
    mon = CollapseMonitor(
        model,
        [probes.PosteriorCollapse("posterior", name="vae")],
        log_every_n_steps=args.log_every,
        sinks=[sink],
        pictures=not args.no_pictures,
    )
    history = []
    for _ in tqdm(range(args.epochs), desc=out.name, unit="epoch", leave=False):
        for idx in torch.randperm(len(x)).split(args.batch_size):
            with mon.observe():
                recon, mu, logvar = model(x[idx])
            rec = (recon - x[idx]).pow(2).sum(1).mean() / 0.1  # Gaussian decoder, sigma^2 = 0.05
            kl = (0.5 * (mu.pow(2) + logvar.exp() - logvar - 1)).mean(0)  # per dimension, nats
            kl_term = kl.clamp_min(free_bits).sum() if free_bits > 0 else kl.sum()
            loss = rec + args.beta * kl_term
            opt.zero_grad()
            loss.backward()
            opt.step()
            metrics = mon.step(optimizer=opt)
            if metrics is not None:
                with torch.no_grad():
                    test_rec, _, _ = model(x_test)
                    mse = (test_rec - x_test).pow(2).mean().item()
                sink.writer.add_scalar("test/reconstruction_mse", mse, mon.global_step)
                history.append((mon.global_step, metrics, mse))
    mon.close()
    _, final, mse = history[-1]
    return {
        "history": history,
        "active_units": final["collapse/vae/active_units"],
        "kl_total": final["collapse/vae/kl_total"],
        "test_mse": mse,
        "passive": final["collapse/vae/units_passive"],
    }


def plot(runs: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    panels = [
        ("collapse/vae/active_units", f"active units (of {LATENT})"),
        ("collapse/vae/kl_total", "KL (nats)"),
        (None, "held-out reconstruction MSE"),
    ]
    for label, run in runs.items():
        steps = [s for s, _, _ in run["history"]]
        for ax, (key, title) in zip(axes, panels):
            ys = [m[key] if key else mse for _, m, mse in run["history"]]
            ax.plot(steps, ys, label=label)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    axes[0].set_ylim(0, LATENT + 0.5)
    axes[0].legend()
    fig.suptitle("VAE on digits (beta = 4): posterior collapse and free bits (collapse-monitor)")
    fig.savefig(png, dpi=90)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--beta", type=float, default=4.0)
    parser.add_argument("--free-bits", type=float, default=0.5, help="nats per dimension")
    parser.add_argument(
        "--log-every", type=int, default=12, help="steps per window (12 = one epoch)"
    )
    parser.add_argument("--out", default="runs/vae")
    parser.add_argument("--png", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-pictures", action="store_true", help="no TensorBoard pictures (a render per log)"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    runs = {}
    for label, fb in (("plain", 0.0), (f"free bits {args.free_bits}", args.free_bits)):
        start = time.time()
        runs[label] = run = train(fb, args, out / ("free_bits" if fb else "plain"))
        print(
            f"{label:16s} active units {run['active_units']:.0f}/{LATENT}  passive "
            f"{run['passive']:.0f}  KL {run['kl_total']:.2f} nats  held-out MSE "
            f"{run['test_mse']:.4f}  ({time.time() - start:.0f}s)",
            flush=True,
        )
    png = Path(args.png) if args.png else out / "vae_posterior_collapse.png"
    plot(runs, png)
    print(f"logs: {out}  figure: {png}  view: tensorboard --logdir {out}")
    return runs


if __name__ == "__main__":
    main()
