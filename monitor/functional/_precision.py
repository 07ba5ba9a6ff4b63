"""The dtype of the monitor's per-step GEMMs (docs/metrics.md#precision).

The statistics are float64 and their readouts stay float64; the GEMMs a recorded step runs (the
Gram ``Z'Z`` of the second-moment statistics, the sketch of wide embeddings, NC4's distances to
the class centres) are ``O(N D^2)`` or ``O(N C D)`` and run at the device's float64 rate.
Data-centre GPUs run float64 at half the float32 rate; most others (GeForce, RTX, L4, A10, B300)
at 1/32 to 1/64, where these GEMMs would cost more than the model's step. There they run in
IEEE float32 (TF32 off, whatever ``torch.set_float32_matmul_precision`` says) on inputs that are
centred first, and their results are added into the float64 state.
"""

from __future__ import annotations

import contextlib
import functools

import torch

_F64 = torch.float64
# CUDA compute capabilities whose float64 runs at half the float32 rate: P100, V100, A100,
# H100/H200, B200
_FAST_FLOAT64 = {(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)}
CHOICES = (None, torch.float32, torch.float64)


def check(dtype: torch.dtype | None) -> torch.dtype | None:
    """``dtype`` if it is one of :data:`CHOICES`.

    Raises:
        ValueError: any other value.
    """
    if dtype not in CHOICES:
        raise ValueError(f"matmul_dtype must be None, torch.float32 or torch.float64, got {dtype}")
    return dtype


@functools.lru_cache(maxsize=16)
def _default(device: torch.device) -> torch.dtype:
    if device.type == "cpu":
        return _F64
    if device.type == "cuda" and torch.cuda.get_device_capability(device) in _FAST_FLOAT64:
        return _F64
    return torch.float32


def matmul_dtype(chosen: torch.dtype | None, device: torch.device) -> torch.dtype:
    """``chosen``, or when ``None`` float64 on the CPU and on CUDA devices with fast float64
    and float32 elsewhere."""
    return chosen or _default(torch.device(device))


def _precisions() -> tuple[str, str, str]:
    backends = torch.backends
    return (
        torch.get_float32_matmul_precision(),
        backends.cuda.matmul.fp32_precision,
        backends.mkldnn.matmul.fp32_precision,
    )


@contextlib.contextmanager
def tf32_off():
    """Float32 GEMMs in IEEE float32 within the block, whatever the user set, restored after.

    cuBLAS checks that the legacy setting (``torch.set_float32_matmul_precision``) and the new
    one (``torch.backends.cuda.matmul.fp32_precision``) agree and raises otherwise, so both are
    set ("highest" sets both) and both put back.
    """
    saved = _precisions()
    if saved[0] == "highest" and saved[1] != "tf32":
        yield  # already IEEE (the default): nothing to change
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cuda.matmul.fp32_precision = saved[1]
        torch.backends.mkldnn.matmul.fp32_precision = saved[2]


@contextlib.contextmanager
def ieee_float32(device: torch.device):
    """Float32 GEMMs on ``device`` in IEEE float32 within the block: not cast down by the
    user's autocast (the hooks run inside it), no TF32 on CUDA (:func:`tf32_off`)."""
    with torch.autocast(device.type, enabled=False):
        if device.type == "cuda":
            with tf32_off():
                yield
        else:
            yield


def add_gram_(out: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> None:
    """``out (D, D) float64 += z' z`` for ``z (N, D) float64``, the GEMM in ``dtype``.

    float32: ``z`` is rounded to float32, multiplied in IEEE float32 and the product added to
    ``out`` in float64. Each call's entries then carry at most ``(N + 2) u sum_k |z_ki| |z_kj|``
    of rounding (``u = 2^-24``; Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd
    ed., 2002, sec. 3.5): relative to the shifted ``z``, whose shift removes the class means,
    so a readout of the scatter does not amplify it by a cancellation.
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
    relative to the rows' spread, not to an offset they share."""
    a = a.to(_F64)
    if dtype == _F64:
        return a @ b.to(_F64)
    m = a.mean(0)
    with ieee_float32(a.device):
        out = (a - m).to(dtype) @ b.to(dtype)
    return out.to(_F64) + m @ b.to(_F64)
