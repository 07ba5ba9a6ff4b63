"""Attention source 1: calls of ``torch.nn.functional.scaled_dot_product_attention`` made inside
the probe's modules (nanoGPT-style blocks, ``transformers`` models with the SDPA implementation).

Calls are caught with a ``TorchFunctionMode`` that is entered only while a hooked module's forward
runs inside ``observe()``; the layer is the innermost hooked module whose forward made the call
(a module that makes several calls gets ``<path>.sdpa_<k>`` for the k-th after the first).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..base import Call
from .scores import Scores, bind

_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def to_bhld(x: torch.Tensor) -> torch.Tensor:
    """``(..., L, d)`` to ``(B, H, L, d)`` (no head dimension: H = 1)."""
    if x.ndim == 2:
        return x[None, None]
    if x.ndim == 3:
        return x[:, None]
    return x.reshape(-1, x.shape[-3], x.shape[-2], x.shape[-1])


class _Mode(TorchFunctionMode):
    def __init__(self, source: SDPACalls) -> None:
        super().__init__()
        self.source = source

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.source.seen(args, kwargs)
        return func(*args, **kwargs)


class SDPACalls:
    """Tracks which hooked module is running and hands its SDPA calls to the probe."""

    def __init__(self, probe) -> None:
        self.probe = probe
        self.mode = _Mode(self)
        self.stack: list[str] = []  # hooked module paths whose forward is running
        self.calls: dict[str, int] = {}  # SDPA calls per module in the current forward
        self.suppress = 0  # inside modules another source handles from their inputs

    def attach(self, path: str, module, hooks) -> None:
        hooks.forward_pre(module, functools.partial(self._enter, path))
        hooks.forward(module, self._leave, always_call=True)

    def _enter(self, path, module, args, kwargs) -> None:
        if not self.probe._active:
            return
        if not self.stack:
            self.mode.__enter__()
        self.stack.append(path)

    def _leave(self, module, args, kwargs, output) -> None:
        if self.stack:
            self.calls.pop(self.stack.pop(), None)
            if not self.stack:
                self.mode.__exit__(None, None, None)

    def detach(self) -> None:
        while self.stack:
            self._leave(None, None, None, None)

    def seen(self, args, kwargs) -> None:
        if not self.suppress and self.probe._active:
            self.probe.guarded(self._record, args, kwargs)

    def _record(self, args, kwargs) -> None:
        a = bind(_ARGS, args, kwargs)
        path = self.stack[-1] if self.stack else self.probe.module
        k = self.calls.get(path, 0)
        self.calls[path] = k + 1
        layer = path if k == 0 else f"{path}.sdpa_{k}"
        q, key = a["query"], a["key"]
        if not isinstance(q, torch.Tensor) or q.ndim < 2:
            raise self.probe.error(
                layer, f"unexpected scaled_dot_product_attention query {type(q).__name__}"
            )
        q, key = to_bhld(q.detach()), to_bhld(key.detach())
        mask = a.get("attn_mask")
        allowed = additive = None
        if isinstance(mask, torch.Tensor):
            mask = mask.detach()
            mask = mask if mask.ndim >= 2 else mask[None]
            if mask.dtype == torch.bool:
                allowed = mask
            else:
                additive = mask
        scale = a.get("scale") or 1.0 / math.sqrt(q.shape[-1])
        scores = Scores(q, key, scale, bool(a.get("is_causal")), allowed, additive)
        self.probe.record(scores, Call(layer, None), q.device)
