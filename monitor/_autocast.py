"""Autocast switched off where a computation picks its own precision."""

from __future__ import annotations

import contextlib

import torch


def _autocast_on(kind: str) -> bool:
    try:
        return torch.is_autocast_enabled(kind)
    except TypeError:  # torch < 2.4 asks per device type through two functions
        return torch.is_autocast_cpu_enabled() if kind == "cpu" else torch.is_autocast_enabled()


def outside_autocast(device: torch.device | None) -> contextlib.AbstractContextManager:
    """Autocast switched off for the CPU and ``device`` where the caller's forward enabled it: a
    probe recomputes in the precision it chose (float32 attention rows, a head's logits), not in
    the forward's bfloat16 or float16. (Nothing to enter when autocast is off: the hot path.)"""
    kinds = {"cpu", device.type if device is not None else "cpu"}
    on = [kind for kind in kinds if _autocast_on(kind)]
    return _autocast_off(on) if on else contextlib.nullcontext()


@contextlib.contextmanager
def _autocast_off(kinds: list[str]):
    with contextlib.ExitStack() as stack:
        for kind in kinds:
            stack.enter_context(torch.autocast(kind, enabled=False))
        yield
