"""Attention source 1: calls of ``torch.nn.functional.scaled_dot_product_attention`` made inside
the probe's modules (nanoGPT-style blocks, ``transformers`` models with the SDPA implementation),
and of ``flex_attention`` (its ``score_mod`` and block mask: :mod:`.flex`).

Calls are caught with a ``TorchFunctionMode`` that is entered only while a hooked module's forward
runs inside ``observe()``; the layer is the innermost hooked module (PyTorch's own layers are
not hooked: they make no such calls) whose forward made the call
(a module that makes several calls gets ``<path>.sdpa_<k>``, or ``.flex_<k>``, for the k-th after
the first).
Query padding comes from ``observe(mask=)`` or the model's ``attention_mask`` input
(:func:`~collapse_monitor.reading.token_mask`). ``transformers``' grouped-query decoding
step, which packs the query heads of a key-value head into query rows (``pack_gqa``), is unpacked
back into heads.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ...reading import token_mask
from ..base import layer_name
from .flex import FLEX_ATTENTION, FlexCall
from .scores import Scores, bind

_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
# the flex_attention operator's arguments (torch.nn.attention.flex_attention calls it so)
_FLEX_ARGS = (
    "query",
    "key",
    "value",
    "score_mod",
    "block_mask",
    "scale",
    "kernel_options",
    "score_mod_other_buffers",
    "mask_mod_other_buffers",
)


def to_bhld(x: torch.Tensor) -> torch.Tensor:
    """``(..., L, d)`` to ``(B, H, L, d)`` (no head dimension: H = 1)."""
    if x.ndim == 2:
        return x[None, None]
    if x.ndim == 3:
        return x[:, None]
    return x.reshape(-1, x.shape[-3], x.shape[-2], x.shape[-1])


def unpack_gqa(module, q: torch.Tensor, k: torch.Tensor, mask, enable_gqa: bool):
    """Undo ``transformers``' ``pack_gqa``: a decoding step of a grouped-query module
    (``num_key_value_groups = g > 1``) whose query ``(B, H, 1, d)`` was reshaped to
    ``(B, H/g, g, d)`` so that it matches the key heads. Returns ``(q, mask)`` as
    ``(B, H, 1, d)`` and its mask."""
    g = getattr(module, "num_key_value_groups", 1)  # transformers' attention modules
    heads = getattr(getattr(module, "config", None), "num_attention_heads", None)
    if not (isinstance(g, int) and g > 1) or enable_gqa or not isinstance(heads, int):
        return q, mask
    # packed: the key-value heads carry the queries (a prefill of g tokens has all its heads)
    if q.shape[1] != k.shape[1] or q.shape[1] * g != heads or q.shape[2] != g:
        return q, mask
    B, Hk, _, d = q.shape
    q = q.reshape(B, Hk * g, 1, d)
    if isinstance(mask, torch.Tensor) and mask.ndim == 4 and mask.shape[1] == Hk:
        mask = mask.reshape(mask.shape[0], Hk * g, 1, mask.shape[-1])
    return q, mask


class _Mode(TorchFunctionMode):
    def __init__(self, source: SDPACalls) -> None:
        super().__init__()
        self.source = source

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.source.seen(args, kwargs)
        elif FLEX_ATTENTION is not None and func is FLEX_ATTENTION:
            # flex_attention runs its operator inside its own torch.compile(fullgraph=True),
            # which traces this mode: appending to a list is a side effect dynamo replays after
            # the graph (a call into the monitor would break the graph); read when a module ends
            self.source.flex_calls.append((self.source.stack[-1], args, kwargs))
        return func(*args, **kwargs)


class SDPACalls:
    """Tracks which hooked module is running and hands its SDPA calls to the probe."""

    def __init__(self, recorder, root: str) -> None:
        self.recorder = recorder
        self.root = root  # the probe's module path: the layer of calls outside hooked modules
        self.mode = _Mode(self)
        self.stack: list[tuple[str, object]] = []  # hooked modules whose forward is running
        self.inside = False  # the stack is not empty (a plain bool for torch.compile to test)
        self.calls: dict[str, int] = {}  # SDPA calls per module in the current forward
        self.suppress = 0  # inside modules another source handles from their inputs
        # flex_attention calls not yet read, with the innermost hooked module that made each
        self.flex_calls: list[tuple[tuple, tuple, dict]] = []

    def attach(self, path: str, module, hooks) -> None:
        hooks.forward_pre(module, functools.partial(self._enter, path))
        hooks.forward(module, functools.partial(self._leave, path), always_call=True)

    def _enter(self, path, module, args, kwargs) -> None:
        if self.recorder.active:
            self._push(path, module)

    def _leave(self, path, module, args, kwargs, output) -> None:
        if self.inside:
            self._pop(path)

    @torch.compiler.disable
    def _push(self, path, module) -> None:
        if not self.stack:
            self.mode.__enter__()
        self.stack.append((path, module))
        self.inside = True

    @torch.compiler.disable
    def _pop(self, path) -> None:
        if self.stack and self.stack[-1][0] == path:  # only what this module pushed
            calls, self.flex_calls = self.flex_calls, []
            for where, args, kwargs in calls:
                self._seen(where, True, args, kwargs)
            self.calls.pop(self.stack.pop()[0], None)
            if not self.stack:
                self.inside = False
                self.mode.__exit__(None, None, None)

    def detach(self) -> None:
        while self.stack:
            self._pop(self.stack[-1][0])

    def seen(self, args, kwargs) -> None:
        self._seen(self.stack[-1] if self.stack else (self.root, None), False, args, kwargs)

    def _seen(self, where, flex: bool, args, kwargs) -> None:
        if not self.suppress and self.recorder.active:
            self.recorder.guarded(self._record, where, flex, args, kwargs)

    def _record(self, where, flex: bool, args, kwargs) -> None:
        a = bind(_FLEX_ARGS if flex else _ARGS, args, kwargs)
        path, module = where
        k = self.calls.get(path, 0)
        self.calls[path] = k + 1
        kind = "flex" if flex else "sdpa"  # (the k-th call of a module after its first)
        layer = layer_name(path) if k == 0 else f"{layer_name(path)}.{kind}_{k}"
        call = self.recorder.call(layer, module)
        q, key = a["query"], a["key"]
        if not isinstance(q, torch.Tensor) or q.ndim < 2:
            what = "flex_attention" if flex else "scaled_dot_product_attention"
            raise call.error(f"unexpected {what} query {type(q).__name__}")
        q, key = to_bhld(q.detach()), to_bhld(key.detach())
        if flex:  # (B, H, L, d) always; GQA keys have fewer heads (the probe repeats them)
            scale = float(a["scale"])
            parts = {
                "flex": FlexCall(
                    a["score_mod"],
                    a["block_mask"],
                    a.get("score_mod_other_buffers", ()),
                    a.get("mask_mod_other_buffers", ()),
                )
            }
        else:
            mask = a.get("attn_mask")
            q, mask = unpack_gqa(module, q, key, mask, bool(a.get("enable_gqa")))
            parts = {"causal": bool(a.get("is_causal"))}
            if isinstance(mask, torch.Tensor):
                mask = mask.detach()
                mask = mask if mask.ndim >= 2 else mask[None]
                parts["allowed" if mask.dtype == torch.bool else "additive"] = mask
            scale = a.get("scale") or 1.0 / math.sqrt(q.shape[-1])
        queries = token_mask(self.recorder.call(path, module), q.shape[0], q.shape[2], q.device)
        scores = Scores(q, key, scale, queries=queries, **parts)
        self.recorder.record(scores, call, q.device)
