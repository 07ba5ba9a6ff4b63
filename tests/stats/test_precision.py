"""The float32 GEMM path (``matmul_dtype=torch.float32``, the default on GPUs with slow
float64) against the float64 whole-tensor references."""

import math

import pytest
import torch
from torch import nn

from collapse_monitor import CollapseMonitor, probes
from collapse_monitor import functional as F
from collapse_monitor.functional._precision import matmul_dtype
from collapse_monitor.functional.representation import spectrum_metrics
from collapse_monitor.stats import ClassMoments, Moments
from tests.functional.test_neural_collapse import clustered
from tests.reference import assert_metrics_close
from tests.stats.test_class_moments import KEYS, random_split, readout

F32 = torch.float32
U32 = 2.0**-24


def stream(x, y, sizes, C, dtype=F32):
    st = ClassMoments(C, matmul_dtype=dtype)
    for idx in torch.split(torch.arange(len(y)), sizes):
        st.update(x[idx], y[idx])
    return st


@pytest.mark.parametrize(
    "C, D, N, noise, offset",
    [
        (7, 16, 900, 0.5, 0.0),  # C < D
        (30, 6, 900, 0.5, 0.0),  # C > D
        (5, 16, 2000, 1e-3, 1e3),  # near collapse: offset 1e3, within-class noise 1e-3
        (50, 256, 4000, 0.05, 3.0),
    ],
)
def test_float32_gram_equals_the_float64_reference(C, D, N, noise, offset):
    x, y = clustered(C, D, N, noise=noise, offset=offset, weights=torch.linspace(0.2, 3, C))
    x = x.float()
    y[y == 1] = 2  # a class never seen
    ref = F.neural_collapse(x, y, C)
    st = stream(x, y, random_split(N, 9, C), C)
    assert_metrics_close(readout(st), ref, rtol=1e-6, keys=KEYS + ["classes_used"])
    # the path taken was float32: its Gram differs from the float64 one by rounding
    exact = stream(x, y, random_split(N, 9, C), C, torch.float64)
    assert not torch.equal(st.second_moment, exact.second_moment)


def test_float32_rank_metrics_equal_the_float64_reference_and_keep_the_stated_bound():
    g = torch.Generator().manual_seed(0)
    N, D = 3000, 64
    z = (torch.randn(N, D, generator=g) @ torch.randn(D, D, generator=g) + 2.0).float()
    sizes = random_split(N, 7, 0)
    m = Moments(matmul_dtype=F32)
    for part in torch.split(z, sizes):
        m.update(part)
    got = spectrum_metrics(m.n, m.mean(), m.scatter())
    ref = F.representation_rank(z)
    assert_metrics_close(got, ref, rtol=1e-6, keys=["erank", "rankme"])

    # an ill-conditioned spectrum (singular values over six decades): the small singular
    # values carry the documented float32 floor sqrt((n + 2) u q) (n: rows of the largest
    # batch, q = sum ||z_i - shift||^2) on top of the float64 one
    U = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(0, -6, D, dtype=torch.float64)
    z = ((torch.randn(N, D, generator=g, dtype=torch.float64) * s) @ U.T + 5.0).float()
    m = Moments(matmul_dtype=F32)
    for part in torch.split(z, sizes):
        m.update(part)
    out = spectrum_metrics(m.n, m.mean(), m.scatter())
    exact = torch.linalg.svdvals(z.double())
    floor = math.sqrt((max(sizes) + 2) * U32 * float(m.sq_norm.sum())) + math.sqrt(
        2 * D * torch.finfo(torch.float64).eps
    ) * float(exact[0])
    err = (out["singular_values"] - exact).abs().max()
    assert 0 < err <= floor
    assert out["rankme"] == pytest.approx(F.rankme(exact), rel=1e-3)


class Net(nn.Module):
    def __init__(self, D, C):
        super().__init__()
        # full rank: (singular values at the rounding floor are the bound's, see above)
        self.body = nn.Sequential(nn.Linear(D, D), nn.Tanh())
        self.head = nn.Linear(D, C)

    def forward(self, x):
        return self.head(self.body(x))


def _run(dtype, x, y, C, D):
    torch.manual_seed(0)
    net = Net(D, C)
    mon = CollapseMonitor(
        net,
        [
            probes.NeuralCollapse("head", C, matmul_dtype=dtype),
            probes.NeuralCollapse(
                "body", C, read="output", classifier="head", name="nc_out", matmul_dtype=dtype
            ),
            probes.RepresentationRank("body", sketch_dim=D - 4, matmul_dtype=dtype),
        ],
        log_every_n_steps=4,
        observe_every_n_steps=1,
    )
    logs = []
    for idx in torch.split(torch.arange(len(y)), 100):
        with mon.observe(targets=y[idx]):
            net(x[idx])
        logs.append(mon.step())
    mon.close()
    return [m for m in logs if m]


def test_probes_with_float32_matmuls_report_the_float64_numbers():
    C, D = 10, 24
    x, y = clustered(C, D, 1200, noise=0.8, offset=100.0)
    x = x / 30.0  # (Tanh not saturated)  # offset: NC4 distances need the move
    a = _run(F32, x.float(), y, C, D)
    b = _run(torch.float64, x.float(), y, C, D)
    assert len(a) == len(b) == 3
    for got, want in zip(a, b):
        keys = [k for k, v in want.items() if isinstance(v, float) and "spectrum" not in k]
        assert {"collapse/head/ncc_mismatch_lagged", "collapse/nc_out/ncc_mismatch_lagged"} <= set(
            keys
        ) or got is a[0]
        assert_metrics_close(got, want, rtol=1e-6, keys=keys)


def test_the_default_and_its_errors():
    assert matmul_dtype(None, torch.device("cpu")) == torch.float64
    assert matmul_dtype(F32, torch.device("cpu")) == F32
    with pytest.raises(ValueError, match="matmul_dtype must be None, torch.float32"):
        ClassMoments(3, matmul_dtype=torch.float16)
    with pytest.raises(ValueError, match="matmul_dtype"):
        probes.RepresentationRank("x", matmul_dtype=torch.bfloat16)


def _settings():
    from collapse_monitor.functional._precision import _settings as of_both_apis

    b = torch.backends
    return (*of_both_apis(), b.cudnn.conv.fp32_precision)


def _cublas_tf32():
    return torch._C._get_cublas_allow_tf32()  # cuBLAS' own read: raises on disagreeing APIs


@pytest.mark.parametrize(
    "setup",
    [
        lambda: torch.set_float32_matmul_precision("high"),  # legacy API
        lambda: torch.set_float32_matmul_precision("medium"),
        lambda: setattr(torch.backends, "fp32_precision", "tf32"),  # new (transformers)
        lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"),
        lambda: None,  # the default: IEEE already
    ],
)
def test_tf32_off_sets_both_apis_and_puts_the_users_settings_back(setup):
    """cuBLAS raises when the legacy and the new TF32 settings disagree: inside the block both
    say IEEE, whichever API the user set; after it, the user's settings are back exactly."""
    from collapse_monitor.functional._precision import tf32_off

    saved = _settings()
    try:
        setup()
        before = _settings()
        with tf32_off():
            assert torch.get_float32_matmul_precision() == "highest"
            assert not _cublas_tf32()
            assert torch.backends.mkldnn.matmul.fp32_precision in ("ieee", "none")
        assert _settings() == before
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.fp32_precision = saved[1]
        torch.backends.cuda.matmul.fp32_precision = saved[2]
        torch.backends.mkldnn.matmul.fp32_precision = saved[3]
        assert _settings() == saved


def test_float32_gram_is_not_cast_down_by_autocast():
    C, D, N = 6, 32, 600
    x, y = clustered(C, D, N, noise=1e-2, offset=10.0)
    x = x.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        st = stream(x, y, random_split(N, 5, 0), C)
    assert_metrics_close(readout(st), F.neural_collapse(x, y, C), rtol=1e-6, keys=KEYS)
