"""One harness for every probe, in the manner of torchmetrics' ``MetricTester``.

A :class:`Case` gives a probe, a tiny model with the probed module at path ``"m"``, a data set
whose tensors share their first dimension (samples, or sequences), how a batch is fed, and the
float64 whole-tensor reference (``collapse_monitor.functional``) of the metrics. The checks in
``tests/test_harness.py`` run every case through the same battery: streamed equals the reference
on random uneven splits (an empty batch included), two gloo ranks of which one records nothing
(and uneven shards), a resume round trip, and bad input under ``strict=True``. A new probe gets
the battery by adding one case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from collapse_monitor import CollapseMonitor, probes
from collapse_monitor import functional as MF
from collapse_monitor.contracts import Readout
from collapse_monitor.probes import Probe
from collapse_monitor.reading import Reading, floating
from collapse_monitor.stats import Statistic, Window

NAME = "p"  # every case's probe name; the probed module is always at path "m"


class Emit(nn.Module):
    """Returns ``make(x)`` (default: ``x``): the probe reads whatever a batch provides."""

    def __init__(self, make: Callable = lambda x: x) -> None:
        super().__init__()
        self.make = make

    def forward(self, x):
        return self.make(x)


class Heads(nn.Module):
    """nanoGPT-style causal attention whose head count can be changed per call (bad input)."""

    def __init__(self, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.h = heads
        self.qkv = nn.Linear(d, 3 * d)

    def qk(self, x, h=None):
        h = h or self.h
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, h, d // h).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x, h=None):
        q, k, v = self.qk(x, h)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)


def wrap(module: nn.Module) -> nn.Module:
    model = nn.Module()
    model.m = module
    return model


# ------------------------------------------------------------------------------ a new probe
class FeatureSums(Statistic):
    """Sum of each feature ``(D,)`` and the rows summed."""

    def __init__(self) -> None:
        super().__init__()
        self.add_size("D", "feature dimension")
        self.add_state("total", ("D",), torch.float64)
        self.add_state("rows", (), torch.int64)

    def update(self, x: torch.Tensor) -> None:
        self.fix_sizes(D=x.shape[1])
        self.total += x.to(torch.float64).sum(0)
        self.rows += x.shape[0]


class FeatureMean(Probe):
    """The mean of each feature of a module's output ``(N, D)``: a probe in 30 lines."""

    reads = Reading("floating-point features (N, D)", floating(2), hint="features")

    def new_window(self) -> Window:
        return Window({"sums": FeatureSums()})

    def update(self, window, x, call) -> None:
        window["sums"].update(x.detach().reshape(-1, x.shape[-1]))

    def readout(self, window) -> Readout:
        s = window["sums"]
        metrics = {self.key("samples"): float(s.rows)}
        if s.rows:
            for j, v in enumerate((s.total / s.rows).tolist()):
                metrics[self.key("mean", index=f"dim_{j}")] = v
        return Readout(metrics)


# ------------------------------------------------------------------------------ the cases
@dataclass
class Case:
    """One probe in the harness (see the module docstring)."""

    id: str
    probe: Callable[[], Probe]
    module: Callable[[], nn.Module]
    data: Callable[[], dict[str, torch.Tensor]]
    reference: Callable[[nn.Module, dict], dict[str, float]]
    bad: Callable[[nn.Module], None]  # a forward that gives the probe input it must refuse
    bad_match: str
    keywords: Callable[[dict], dict] = field(default=lambda b: {})
    feed: Callable[[nn.Module, dict], None] = field(default=lambda model, b: model.m(b["x"]))
    rel: float = 1e-6

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return wrap(self.module())


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def clustered(C: int, D: int, N: int, seed: int = 0, drop: int | None = None):
    """Features around C well-separated means; class ``drop`` (if any) never appears."""
    g = gen(seed)
    means = 3 * torch.randn(C, D, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    if drop is not None:
        y = torch.where(y == drop, (drop + 1) % C, y)
    return means[y] + torch.randn(N, D, generator=g), y


def nc_data():
    x, y = clustered(7, 6, 400, drop=3)
    return {"x": x, "y": y}


def nc_reference(model, d):
    head = model.m
    ref = MF.neural_collapse(d["x"], d["y"], 7, head.weight, head.bias)
    ref.pop("ncc_mismatch")
    return {**ref, "samples": len(d["y"])}


def group_data():
    x, g = clustered(5, 6, 400, seed=1)
    return {"x": x, "g": g}


def codebook_data():
    g = gen(2)
    idx = torch.randint(0, 20, (500,), generator=g)  # codes 20..23 never used
    return {"x": torch.where(idx < 3, idx, idx * (torch.rand(500, generator=g) < 0.7))}


def codebook_reference(model, d):
    ref = MF.codebook_usage(d["x"], 24)
    dead = (ref["counts"] == 0).sum().item()
    return {
        "perplexity": ref["perplexity"].item(),
        "perplexity_ratio": ref["perplexity"].item() / 24,
        "usage": ref["usage"].item(),
        "samples": ref["samples"].item(),
        "dead_codes": dead,
        "dead_fraction": dead / 24,
    }


def latent_data():
    g = gen(3)
    acts = torch.relu(torch.randn(300, 16, generator=g) - 1.0)
    acts[:, :3] = 0  # three dead latents
    return {"x": acts}


def latent_reference(model, d):
    ref = MF.latent_usage(d["x"])
    return {
        "perplexity": ref["perplexity"].item(),
        "usage": ref["usage"].item(),
        "fire_rate": ref["fire_rate"].item(),
        "samples": ref["rows"].item(),
        "dead_latents": ref["dead"].sum().item(),
    }


def attention_data():
    return {"x": torch.randn(7, 9, 16, generator=gen(4))}


def attention_reference(model, d):
    q, k, _ = model.m.qk(d["x"])
    q, k = q.detach().double(), k.detach().double()
    T = q.shape[2]
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    p = torch.softmax(s.masked_fill(~allowed, -math.inf), -1)
    ref = MF.attention_entropy(p, allowed)
    out = {
        "m/entropy_norm": ref["entropy_norm_mean"],
        "m/entropy_norm_min": ref["entropy_norm_min"],
        "m/overload_fraction": ref["overload_fraction"],
        "m/max_logit": s.masked_fill(~allowed, 0).abs().max().item(),
        "min_entropy_norm": ref["entropy_norm_mean"],
    }
    for h in range(q.shape[1]):
        out[f"m/entropy/head_{h}"] = ref["entropy"][h].item()
        out[f"m/entropy_norm/head_{h}"] = ref["entropy_norm"][h].item()
    return out


def representation_data():
    g = gen(5)
    z = torch.randn(400, 8, generator=g) * torch.linspace(0.1, 3, 8) + 5.0
    return {"x": z}


def representation_reference(model, d):
    ref = MF.representation_rank(d["x"])
    return {k: ref[k] for k in ("erank", "rankme", "norm_std")} | {"samples": len(d["x"])}


def posterior_data():
    g = gen(6)
    mu = torch.randn(300, 5, generator=g) * torch.tensor([1.0, 0.05, 1.0, 0.0, 2.0])
    logvar = torch.randn(300, 5, generator=g) * 0.3 - torch.tensor([2.0, 0.0, 1.0, 0.0, 3.0])
    return {"x": torch.cat([mu, logvar], 1)}


def posterior_reference(model, d):
    ref = MF.posterior_collapse(d["x"][:, :5], d["x"][:, 5:])
    return {k: v for k, v in ref.items() if not isinstance(v, torch.Tensor)}


def logit_data():
    g = gen(7)
    z = torch.randn(300, 10, generator=g) * 4
    z[:20, 0] = 200.0  # softmax-collapsed rows
    y = torch.randint(0, 10, (300,), generator=g)
    y[:20] = 0
    y[20:30] = -100  # ignored
    return {"x": z, "y": y}


def token_data():
    g = gen(8)
    x = torch.randn(6, 7, 5, generator=g) + torch.randn(6, 1, 5, generator=g) * 2
    mask = torch.ones(6, 7, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, 1:] = False  # one token: not counted
    return {"x": x, "mask": mask}


def dormant_data():
    g = gen(9)
    a = torch.relu(torch.randn(300, 12, generator=g))
    a[:, :2] *= 0.001  # dormant units
    return {"x": a}


def dormant_reference(model, d):
    ref = MF.dormant_units(d["x"])
    return {
        "m/dormant_fraction": ref["dormant_fraction"],
        "m/mean_abs": ref["mean_abs"],
        "dormant_fraction": ref["dormant_fraction"],
    }


def feature_mean_reference(model, d):
    means = d["x"].double().mean(0).tolist()
    return {"samples": len(d["x"])} | {f"mean/dim_{j}": v for j, v in enumerate(means)}


def _feed_bad(bad):
    return lambda model: model.m(bad)


CASES = [
    Case(
        "neural_collapse",
        lambda: probes.NeuralCollapse("m", 7, name=NAME),
        lambda: nn.Linear(6, 7),
        nc_data,
        nc_reference,
        _feed_bad(torch.randn(6)),
        r"expected floating-point features \(N, D\) or \(B, T, D\) as the module's input, "
        r"got Tensor torch.float32 \(6,\)",
        keywords=lambda b: {"targets": b["y"]},
    ),
    Case(
        "group_collapse",
        lambda: probes.GroupCollapse("m", 5, name=NAME),
        nn.Identity,
        group_data,
        lambda model, d: MF.group_collapse(d["x"], d["g"], 5),
        _feed_bad(torch.randn(4, 6)),  # groups of another batch
        r"groups of shape \(400,\) do not match values of shape \(4, 6\)",
        keywords=lambda b: {"groups": b["g"]},
    ),
    Case(
        "codebook_usage",
        lambda: probes.CodebookUsage("m", 24, dead="window", name=NAME),
        Emit,
        codebook_data,
        codebook_reference,
        _feed_bad(torch.zeros(4)),
        "expected a single integer tensor of code indices as the module's output, "
        r"got Tensor torch.float32 \(4,\)",
    ),
    Case(
        "latent_usage",
        lambda: probes.LatentUsage("m", 16, name=NAME),
        Emit,
        latent_data,
        latent_reference,
        _feed_bad(torch.zeros(4, 15)),
        r"expected activations \(..., 16\), got \(4, 15\)",
    ),
    Case(
        "attention_entropy",
        lambda: probes.AttentionEntropy("m", queries=None, name=NAME),
        Heads,
        attention_data,
        attention_reference,
        lambda model: (model.m(torch.randn(2, 9, 16)), model.m(torch.randn(2, 9, 16), h=2)),
        "head count changed from 4 to 2",
    ),
    Case(
        "representation_rank",
        lambda: probes.RepresentationRank("m", name=NAME),
        Emit,
        representation_data,
        representation_reference,
        _feed_bad(torch.zeros(4, 8, dtype=torch.long)),
        r"expected floating-point embeddings .* got Tensor torch.int64 \(4, 8\)",
    ),
    Case(
        "posterior_collapse",
        lambda: probes.PosteriorCollapse("m", name=NAME),
        lambda: Emit(lambda x: (x[:, :5], x[:, 5:])),
        posterior_data,
        posterior_reference,
        _feed_bad(torch.zeros(4, 9)),
        r"expected \(mu, logvar\).*got tuple\(Tensor torch.float32 \(4, 5\), "
        r"Tensor torch.float32 \(4, 4\)\)",
    ),
    Case(
        "logit_health",
        lambda: probes.LogitHealth("m", nlm=False, name=NAME),
        Emit,
        logit_data,
        lambda model, d: MF.logit_health(d["x"], d["y"]),
        _feed_bad(torch.zeros(4, 10, dtype=torch.long)),
        r"expected floating-point logits \(..., C\) as the module's output, "
        r"got Tensor torch.int64 \(4, 10\)",
        keywords=lambda b: {"targets": b["y"]},
    ),
    Case(
        "token_uniformity",
        lambda: probes.TokenUniformity("m", name=NAME),
        Emit,
        token_data,
        lambda model, d: {
            f"m/{k}": v for k, v in MF.mean_token_uniformity(d["x"], d["mask"]).items()
        },
        _feed_bad(torch.zeros(4, 5)),
        r"expected floating-point hidden states \(B, T, D\) as the module's output, "
        r"got Tensor torch.float32 \(4, 5\)",
        keywords=lambda b: {"mask": b["mask"]},
    ),
    Case(
        "dormant_units",
        lambda: probes.DormantUnits("m", name=NAME),
        Emit,
        dormant_data,
        dormant_reference,
        _feed_bad(torch.zeros(4)),
        r"expected floating-point activations .* got Tensor torch.float32 \(4,\)",
    ),
    Case(
        "feature_mean",
        lambda: FeatureMean("m", name=NAME),
        Emit,
        representation_data,
        feature_mean_reference,
        _feed_bad(torch.zeros(4)),
        r"expected floating-point features \(N, D\) as the module's output",
    ),
]


# ------------------------------------------------------------------------------ running a case
def monitor(case: Case, model: nn.Module, log_every: int = 10**9) -> CollapseMonitor:
    return CollapseMonitor(model, [case.probe()], log_every, strict=True, observe_every_n_steps=1)


def batches(data: dict, sizes: list[int]) -> list[dict]:
    n = next(iter(data.values())).shape[0]
    assert sum(sizes) == n
    idx = torch.split(torch.arange(n), sizes)
    return [{k: v[i] for k, v in data.items()} for i in idx]


def uneven_sizes(n: int, seed: int, parts: int = 6) -> list[int]:
    """Random uneven batch sizes summing to ``n``, an empty batch among them."""
    g = gen(100 + seed)
    cuts = sorted(torch.randint(1, n, (parts - 1,), generator=g).tolist())
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, n])]
    sizes.insert(int(torch.randint(0, parts, (1,), generator=g)), 0)
    return sizes


def stream(case: Case, mon: CollapseMonitor, model: nn.Module, parts: list[dict]) -> None:
    """Feed ``parts``, one observed training step each."""
    for b in parts:
        with mon.observe(**case.keywords(b)):
            case.feed(model, b)
        mon.step()


def relative(metrics: dict[str, float]) -> dict[str, float]:
    """``{"<metric>": value}`` of the case probe's keys (``collapse/p/`` removed)."""
    prefix = f"collapse/{NAME}/"
    return {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}


def assert_matches(got: dict[str, float], want: dict[str, float], rel: float) -> None:
    for key, value in want.items():
        assert key in got, f"missing {key}; got {sorted(got)}"
        value = float(value)
        assert abs(got[key] - value) <= rel * abs(value) + 1e-12, (key, got[key], value)
