"""The float32 GEMM path of the second-moment statistics (issue 30, point 3): its error against
the float64 whole-tensor reference and its time against the float64 path, on one device.

For each case: ``C`` classes of ``D`` features around class means drawn from N(0, 4 I) plus
``offset``, within-class noise ``noise``, ``N`` float32 rows in batches of ``batch``; the largest
relative difference over nc1, nc1_quotient, equinorm_features, equiangular, cos_std and cdnv
between ``ClassMoments(matmul_dtype=torch.float32)`` and ``functional.neural_collapse`` (float64,
two passes), and the median milliseconds of one ``update`` of ``batch`` rows with each dtype.

    python benchmarks/run.py --only precision [--write]     # the CPU
    python benchmarks/run.py --only gpu --write             # also on the GPU, in section 5
"""

from __future__ import annotations

import statistics
import time

import torch

from collapse_monitor import functional as F
from collapse_monitor.functional._precision import matmul_dtype
from collapse_monitor.stats import ClassMoments

KEYS = ("nc1", "nc1_quotient", "equinorm_features", "equiangular", "cos_std", "cdnv")
CASES = [  # C, D, N, batch, noise, offset
    (10, 64, 4096, 256, 1.0, 0.0),
    (10, 64, 4096, 256, 1e-3, 1e3),
    (100, 512, 8192, 1024, 0.3, 1.0),
    (100, 512, 8192, 4096, 1e-3, 1e3),
    (10, 768, 16384, 8192, 0.1, 3.0),
    (1000, 256, 20000, 4096, 0.5, 0.0),
]


def _data(C, D, N, noise, offset):
    g = torch.Generator().manual_seed(1)
    means = torch.randn(C, D, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, C, (N,), generator=g)
    x = offset + means[y] + noise * torch.randn(N, D, generator=g, dtype=torch.float64)
    return x.float(), y


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _update_ms(dtype, x, y, C, device, reps) -> float:
    m = ClassMoments(C, matmul_dtype=dtype)
    m.update(x, y)
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        m.update(x, y)
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def rows(device: str = "cpu", quick: bool = False) -> list[list]:
    out = []
    for C, D, N, batch, noise, offset in CASES:
        x, y = _data(C, D, N, noise, offset)
        ref = F.neural_collapse(x, y, C)
        st = ClassMoments(C, matmul_dtype=torch.float32)
        for i in range(0, N, batch):
            st.update(x[i : i + batch].to(device), y[i : i + batch].to(device))
        st = st.to("cpu")
        got = F.metrics_from_class_statistics(
            st.count, st.means(), st.within_class_scatter(), st.class_variances()
        )
        err = max(abs(got[k] - ref[k]) / abs(ref[k]) for k in KEYS)
        xb, yb = x[:batch].to(device), y[:batch].to(device)
        reps = 3 if quick else 11
        ms = [_update_ms(dt, xb, yb, C, device, reps) for dt in (torch.float64, torch.float32)]
        out.append([C, D, N, batch, noise, offset, f"{err:.1e}", f"{ms[0]:.2f}", f"{ms[1]:.2f}"])
        print(out[-1], flush=True)
    return out


def section(quick: bool, table, device: str = "cpu") -> list[str]:
    where = torch.cuda.get_device_name() if device == "cuda" else "the CPU"
    return [
        f"### 14. The float32 Gram against float64 on {where}",
        "",
        "`ClassMoments(matmul_dtype=torch.float32)` against the float64 two-pass reference "
        "(largest relative difference of the NC metrics) and the time of one update of a batch "
        "with each dtype (median; `benchmarks/precision.py`). The default on this device: "
        f"{str(matmul_dtype(None, torch.device(device))).removeprefix('torch.')}.",
        "",
    ] + table(
        ["C", "D", "N", "batch", "noise", "offset", "max rel. error", "ms f64", "ms f32"],
        rows(device, quick),
    )
