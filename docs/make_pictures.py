"""Draw docs/probes/<probe>.png: each probe's own picture on a healthy and on a collapsed input.

The inputs are synthetic and small, chosen so that each side shows the textbook case; the
pictures are the ones the monitor writes to TensorBoard with ``pictures=True``.

    python docs/make_pictures.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from collapse_monitor import CollapseMonitor, probes
from collapse_monitor.pictures import render

OUT = Path(__file__).resolve().parent / "probes"
g = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=g)


class Emit(nn.Module):
    """Returns whatever it is given: the probes read it as the module's output."""

    def forward(self, x):
        return x


def draw(model: nn.Module, probe, feed, key: str | None, title: str, **context) -> np.ndarray:
    """Watch ``model`` with ``probe``, run ``feed()`` once, render the probe's ``key`` picture
    (its first one when ``key`` is None)."""
    mon = CollapseMonitor(model, [probe], 10**9, observe_every_n_steps=1)
    with mon.observe(**context):
        feed()
    mon.compute()
    pics = {str(k).rsplit("/", 1)[-1]: pic for k, pic in probe.last.pictures.items()}
    pic = pics[key] if key else next(iter(pics.values()))
    pic.title = f"{title}\n{pic.title}"
    mon.close()
    return render(pic, size=(5.0, 4.0), dpi=80)


def picture(probe, inputs, key: str | None = None, title: str = "", **context) -> np.ndarray:
    """The picture of ``probe`` reading ``inputs`` as the output of an identity module."""
    model = nn.Sequential()
    model.add_module("m", Emit())
    return draw(model, probe, lambda: model.m(inputs), key, title, **context)


def pair(name: str, healthy: np.ndarray, collapsed: np.ndarray) -> None:
    h = max(healthy.shape[0], collapsed.shape[0])
    pad = [
        np.pad(a, ((0, h - a.shape[0]), (0, 0), (0, 0)), constant_values=255)
        for a in (healthy, collapsed)
    ]
    Image.fromarray(np.concatenate(pad, 1)).save(OUT / f"{name}.png", optimize=True)
    print(OUT / f"{name}.png")


def neural_collapse():
    C, D, n = 8, 32, 40
    y = torch.arange(C).repeat(n)
    early = randn(C, D)[y] * 0.5 + randn(C * n, D) * 2.0
    etf = torch.cat([torch.eye(C) - 1.0 / C, torch.zeros(C, D - C)], 1) * 4
    terminal = etf[y] + randn(C * n, D) * 0.01
    args = dict(key="class_mean_cosines")
    pair(
        "neural_collapse",
        picture(
            probes.NeuralCollapse("m", C, read="output"),
            early,
            title="early training",
            targets=y,
            **args,
        ),
        picture(
            probes.NeuralCollapse("m", C, read="output"),
            terminal,
            title="terminal phase (collapsed to the ETF)",
            targets=y,
            **args,
        ),
    )
    groups = y % 4
    pair(
        "group_collapse",
        picture(
            probes.GroupCollapse("m", 4),
            randn(C * n, D),
            title="healthy: groups do not matter",
            groups=groups,
        ),
        picture(
            probes.GroupCollapse("m", 4),
            etf[groups] + randn(C * n, D) * 0.01,
            title="collapsed onto the nuisance groups",
            groups=groups,
        ),
    )


def codebook():
    K, N = 256, 8192
    spread = torch.randint(0, K, (N,), generator=g)
    few = torch.multinomial(
        torch.tensor([1.0 / (k + 1) ** 3 for k in range(K)]), N, True, generator=g
    )
    pair(
        "codebook_usage",
        picture(probes.CodebookUsage("m", K), spread, title="healthy: all codes in use"),
        picture(probes.CodebookUsage("m", K), few, title="collapsed: a handful of codes"),
    )
    acts = torch.relu(randn(2048, 128))
    dead = acts * (torch.arange(128) < 16)
    pair(
        "latent_usage",
        picture(probes.LatentUsage("m", 128), acts, title="healthy: every latent fires"),
        picture(probes.LatentUsage("m", 128), dead, title="collapsed: most latents never fire"),
    )


class Attn(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x):  # 4 heads attending with sharpness growing by head
        q = x[:, None] * (self.scale * torch.tensor([0.25, 0.5, 1.0, 2.0]))[None, :, None, None]
        return nn.functional.scaled_dot_product_attention(q, x[:, None], x[:, None], is_causal=True)


def attention():
    x = randn(2, 64, 16)
    outs = []
    for scale, title in (
        (0.05, "healthy: spread attention"),
        (2.0, "collapse in the deeper layers"),
    ):
        model = nn.Sequential(*[Attn(scale * (1 + i)) for i in range(4)])
        probe = probes.AttentionEntropy("*", queries=None)
        outs.append(
            draw(model, probe, lambda m=model: [layer(x) for layer in m], "entropy_heatmap", title)
        )
    pair("attention_entropy", *outs)


def representations():
    iso = randn(2048, 64)
    low = randn(2048, 2) @ randn(2, 64) + 1e-3 * randn(2048, 64)
    pair(
        "representation_rank",
        picture(probes.RepresentationRank("m"), iso, title="healthy: variance in every direction"),
        picture(probes.RepresentationRank("m"), low, title="dimensional collapse: rank 2"),
    )
    mu = randn(2048, 16)
    post = (mu, torch.full((2048, 16), -2.0))
    collapsed_mu = mu * (torch.arange(16) < 3)
    collapsed = (collapsed_mu, torch.where(torch.arange(16) < 3, -2.0, 0.0).expand(2048, 16))
    pair(
        "posterior_collapse",
        picture(
            probes.PosteriorCollapse("m"), post, title="healthy: every latent carries information"
        ),
        picture(
            probes.PosteriorCollapse("m"),
            collapsed,
            title="posterior collapse: 13 of 16 latents unused",
        ),
    )


def depth_and_units():
    B, T, D = 8, 32, 64
    outs = []
    for shrink, title in (
        (1.0, "healthy: tokens stay distinct"),
        (0.2, "rank collapse with depth"),
    ):
        model = nn.Sequential(*[Emit() for _ in range(6)])
        x = randn(B, T, D)
        common = x.mean(1, keepdim=True)

        def feed(m=model, x=x, common=common, shrink=shrink):
            for i, layer in enumerate(m):
                layer(common + (x - common) * shrink**i)

        outs.append(draw(model, probes.TokenUniformity("*"), feed, "r_f_by_depth", title))
    pair("token_uniformity", *outs)
    acts = torch.relu(randn(1024, 128) + 0.5)
    dormant = acts * torch.where(torch.arange(128) < 40, 0.01, 1.0)
    pair(
        "dormant_units",
        picture(probes.DormantUnits("m"), acts, title="healthy: every unit active"),
        picture(probes.DormantUnits("m"), dormant, title="40 of 128 units dormant"),
    )


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    neural_collapse()
    codebook()
    attention()
    representations()
    depth_and_units()
