"""SimVQ side by side with the authors' code on one VQ autoencoder.

The authors' quantiser (Zhu et al. 2024, github.com/youngsheen/SimVQ,
``taming/modules/vqvae/quantize.py``, class ``SimVQ``) is not vendored: pass the path of a
checkout's file with ``--authors``. The same autoencoder on digits (4 code vectors of size 8
per image, 1024 codes, Adam 1e-3, batches of 128, 400 steps), the same seed for the data, the
encoder and decoder and the batches, trained with

- ``authors``: their ``SimVQ(1024, 8, beta=0.25, legacy=False)`` (C ~ N(0, 1/D) frozen, W and b of
  a fresh ``nn.Linear``), the latent passed as ``(B, D, 4, 1)``;
- ``ours``: a plain nearest-code quantiser with ``mitigations.SimVQ("quantizer")`` at the start
  (``basis="paper"``, the default);
- ``ours, codebook basis``: the same with ``basis="codebook"`` (C = the Gaussian codebook,
  W = I, b = 0: the function-preserving switch);
- ``plain VQ``: no SimVQ.

Reported: the final codebook usage, the fraction of the 1024 codes that the training set's 6000
code vectors choose, per seed. ``python benchmarks/simvq_side_by_side.py --authors
PATH/quantize.py [--write]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from collapse_monitor import CollapseMonitor, mitigations, probes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from vq_dead_codes import TOKENS, Quantizer, digits  # noqa: E402

DIM, CODES, STEPS = 8, 1024, 400


class AutoEncoder(nn.Module):
    def __init__(self, quantizer: nn.Module, authors: bool) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, TOKENS * DIM))
        self.quantizer = quantizer
        self.decoder = nn.Sequential(nn.Linear(TOKENS * DIM, 256), nn.ReLU(), nn.Linear(256, 64))
        self.authors = authors

    def codes(self, x: torch.Tensor):
        """``(quantized (B, TOKENS, DIM), indices, quantiser loss)``."""
        z = self.encoder(x).view(-1, TOKENS, DIM)
        if not self.authors:
            return self.quantizer(z)
        (q, _, idx), parts = self.quantizer(z.transpose(1, 2)[..., None])  # (B, D, 4, 1)
        return q[..., 0].transpose(1, 2), idx.view(-1, TOKENS), parts.commitment

    def forward(self, x: torch.Tensor):
        q, _, loss = self.codes(x)
        return self.decoder(q.flatten(1)), loss


def authors_quantizer(path: str) -> type:
    spec = importlib.util.spec_from_file_location("simvq_authors", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimVQ


def train(variant: str, seed: int, authors_path: str | None = None, steps: int = STEPS) -> float:
    """The final usage of one run: ``variant`` is ``authors``, ``ours``, ``ours_codebook`` or
    ``plain``."""
    x, _ = digits(seed)
    torch.manual_seed(seed)  # the same encoder and decoder for every variant
    model = AutoEncoder(nn.Identity(), variant == "authors")
    torch.manual_seed(seed + 1)
    if variant == "authors":
        model.quantizer = authors_quantizer(authors_path)(CODES, DIM, beta=0.25, legacy=False)
    else:
        model.quantizer = Quantizer(CODES, DIM, init="gaussian")
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    fixes = {
        "ours": [mitigations.SimVQ("quantizer", optimizer=opt, seed=seed)],
        "ours_codebook": [mitigations.SimVQ("quantizer", optimizer=opt, basis="codebook")],
    }.get(variant, [])
    mon = CollapseMonitor(
        model,
        [] if variant == "authors" else [probes.CodebookUsage("quantizer", CODES, name="vq")],
        50,
        mitigations=fixes,
    )
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        with mon.observe():
            recon, vq_loss = model(x[idx])
        loss = (recon - x[idx]).pow(2).mean() + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(optimizer=opt)
    mon.close()
    with torch.no_grad():
        _, codes, _ = model.codes(x)
    return torch.bincount(codes.flatten(), minlength=CODES).gt(0).double().mean().item()


VARIANTS = {
    "authors": "authors' `SimVQ` (youngsheen/SimVQ)",
    "ours": '`mitigations.SimVQ("quantizer")` at the start (`basis="paper"`)',
    "ours_codebook": '`mitigations.SimVQ(..., basis="codebook")` at the start',
    "plain": "plain VQ (Gaussian codebook, no SimVQ)",
}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--authors", required=True, help="path of the authors' quantize.py")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    t = time.perf_counter()
    usage = {v: [train(v, s, args.authors) for s in seeds] for v in VARIANTS}
    lines = [
        "| quantiser | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
        "|---" * (len(seeds) + 2) + "|",
        *(
            f"| {VARIANTS[v]} | "
            + " | ".join(f"{u:.3f}" for u in us)
            + f" | {statistics.mean(us):.3f} |"
            for v, us in usage.items()
        ),
    ]
    print("\n".join(lines))
    if args.write:
        from run import write_section

        write_section(
            "simvq",
            "8. SimVQ side by side with the authors' code",
            [
                "`python benchmarks/simvq_side_by_side.py --authors PATH/quantize.py --write` "
                "(youngsheen/SimVQ at d8bd94d, `taming/modules/vqvae/quantize.py`). Final codebook "
                f"usage (codes chosen by the training set's {1500 * TOKENS} vectors, of {CODES}) "
                f"after {STEPS} steps; the same autoencoder, data, seed and batches per column:",
                "",
                *lines,
            ],
            time.perf_counter() - t,
            "one torch thread",
        )
    return usage


if __name__ == "__main__":
    main()
