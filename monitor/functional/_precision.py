"""The dtype of the monitor's per-step GEMMs (docs/metrics.md#precision).

The statistics are float64 and their readouts stay float64; the GEMMs a recorded step runs (the
Gram ``Z'Z`` of the second-moment statistics, the sketch of wide embeddings, NC4's distances to
the class centres) are ``O(N D^2)`` or ``O(N C D)`` and run at the device's float64 rate. A few
data-centre GPUs run float64 at half the float32 rate (P100, V100, A100, H100, H200, B200, AMD
MI200/MI300); the others (GeForce, RTX, L4, L40, A10, H800, H20, B300) at 1/32 to 1/64, where
these GEMMs would cost more than the model's step. There they run in IEEE float32 (TF32 and
reduced precision off for the call, whatever ``torch.set_float32_matmul_precision`` or
``torch.backends.*.fp32_precision`` say, and put back after) on inputs that are centred first,
and their results are added into the float64 state.
"""

from __future__ import annotations

import contextlib
import functools
import re

import torch

_F64 = torch.float64
# CUDA compute capabilities whose float64 runs at half the float32 rate: P100, V100, A100,
# H100/H200, B200 (but not the export parts of the same capability: H800, H20)
FAST_FLOAT64 = {(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)}
_SLOW_NAMES = re.compile(r"\bH(800|20)\b")
CHOICES = (None, torch.float32, torch.float64)


def check_matmul_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    """``dtype`` if it is one of :data:`CHOICES` (``None``: the device's default).

    Raises:
        ValueError: any other value.
    """
    if dtype not in CHOICES:
        raise ValueError(
            f"matmul_dtype must be None, torch.float32 or torch.float64, got {dtype!r}"
        )
    return dtype


@functools.lru_cache(maxsize=16)
def _default(device: torch.device) -> torch.dtype:
    if device.type == "cpu":
        return _F64
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.version.hip is not None:  # ROCm: the Instinct MI200/MI300 parts
            return _F64 if re.search(r"\bMI[23]\d\d", name) else torch.float32
        cap = torch.cuda.get_device_capability(device)
        if cap in FAST_FLOAT64 and not _SLOW_NAMES.search(name):
            return _F64
    return torch.float32


def matmul_dtype(chosen: torch.dtype | None, device: torch.device) -> torch.dtype:
    """``chosen``, or when ``None`` float64 on the CPU and on GPUs with fast float64 and
    float32 elsewhere (see the module docstring)."""
    return check_matmul_dtype(chosen) or _default(torch.device(device))


def _settings() -> tuple:
    """The float32 matmul settings of both APIs (the legacy one None when it cannot be read:
    the user set the new one, ``torch.backends.fp32_precision``, and torch refuses to say)."""
    backends = torch.backends
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:
        legacy = None
    return (
        legacy,
        backends.fp32_precision,
        backends.cuda.matmul.fp32_precision,
        backends.mkldnn.matmul.fp32_precision,
    )


@contextlib.contextmanager
def tf32_off():
    """Float32 GEMMs in IEEE float32 within the block, whatever the user set, put back after.

    cuBLAS checks that the legacy setting (``torch.set_float32_matmul_precision``) and the new
    one (``torch.backends.cuda.matmul.fp32_precision``) agree and raises otherwise; ``"highest"``
    sets both (and oneDNN's) to IEEE. Both are put back, the new ones last (the legacy setter
    writes them too).
    """
    saved = _settings()
    legacy, _, cuda, mkldnn = saved
    if legacy == "highest" and cuda != "tf32" and mkldnn in ("ieee", "none"):
        yield  # already IEEE (the default): nothing to change
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        backends = torch.backends
        backends.fp32_precision = saved[1]
        backends.cuda.matmul.fp32_precision = cuda
        backends.mkldnn.matmul.fp32_precision = mkldnn


@contextlib.contextmanager
def ieee_float32(device: torch.device):
    """Float32 GEMMs on ``device`` in IEEE float32 within the block: not cast down by the
    user's autocast (the hooks run inside it), no TF32 or reduced precision (:func:`tf32_off`)."""
    with torch.autocast(device.type, enabled=False), tf32_off():
        yield


def add_gram_(out: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> None:
    """``out (D, D) float64 += z' z`` for ``z (N, D) float64``, the GEMM in ``dtype``.

    float32: ``z`` is rounded to float32, multiplied in IEEE float32 and the product added to
    ``out`` in float64. Each call's entries then carry at most about ``(N + 2) u sum_k |z_ki|
    |z_kj|`` of rounding (``u = 2^-24``; the first-order bound of Higham, *Accuracy and
    Stability of Numerical Algorithms*, 2nd ed., 2002, sec. 3.5, for ``N u << 1``). The rows
    ``z`` are the features minus their class's shift (the previous window's class mean): the
    rounding is relative to the spread around it, not to the class means, so a readout of the
    scatter does not amplify it by a cancellation.
    """
    if dtype == _F64:
        out.addmm_(z.T, z)
        return
    z = z.to(dtype)
    with ieee_float32(z.device):
        out += z.T @ z


def matmul64(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` as float64, the GEMM in ``dtype``. In float32 (IEEE) ``a``'s rows are first
    moved by their mean ``m``, and ``m @ b`` is added back in float64: the rounding is then
    relative to the rows' spread, not to an offset they share. The rows must be finite (one
    NaN row would spoil the mean, hence every row)."""
    a = a.to(_F64)
    if dtype == _F64:
        return a @ b.to(_F64)
    m = a.mean(0)
    with ieee_float32(a.device):
        out = (a - m).to(dtype) @ b.to(dtype)
    return out.to(_F64) + m @ b.to(_F64)
