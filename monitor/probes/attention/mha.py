"""Attention source 2: ``nn.MultiheadAttention``, recomputed from the module's inputs and its
projection weights (its fast path and its internal calls skip Python-level hooks).

``key_padding_mask`` and ``attn_mask`` follow PyTorch's convention (True or ``-inf`` = masked);
``is_causal`` applies when no ``attn_mask`` is given.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..base import Call
from .scores import Scores, bind

_ARGS = (
    "query",
    "key",
    "value",
    "key_padding_mask",
    "need_weights",
    "attn_mask",
    "average_attn_weights",
    "is_causal",
)


def mha_scores(probe, path: str, mha: nn.MultiheadAttention, a: dict) -> Scores:
    """The q, k and masks of one ``nn.MultiheadAttention`` call, from its bound arguments."""
    if mha.bias_k is not None or mha.add_zero_attn:
        raise probe.error(path, "add_bias_kv and add_zero_attn are not supported; pass extract=")
    query, key = a["query"], a["key"]
    if query.is_nested or key.is_nested:
        raise probe.error(
            path,
            "nested-tensor inputs are not supported (TransformerEncoder(enable_nested_tensor=False))",
        )
    if query.ndim == 2:
        query, key = query[None], key[None]
    elif not mha.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    E, H = mha.embed_dim, mha.num_heads
    if mha._qkv_same_embed_dim:
        wq, wk = mha.in_proj_weight[:E], mha.in_proj_weight[E : 2 * E]
    else:
        wq, wk = mha.q_proj_weight, mha.k_proj_weight
    bq = bk = None
    if mha.in_proj_bias is not None:
        bq, bk = mha.in_proj_bias[:E].detach(), mha.in_proj_bias[E : 2 * E].detach()
    q = F.linear(query.detach(), wq.detach(), bq)
    k = F.linear(key.detach(), wk.detach(), bk)
    B, L, S = q.shape[0], q.shape[1], k.shape[1]
    q = q.view(B, L, H, E // H).transpose(1, 2)
    k = k.view(B, S, H, E // H).transpose(1, 2)
    scores = Scores(q, k, 1.0 / math.sqrt(E // H))

    def add(mask, shape):
        mask = mask.detach().reshape(shape)
        if mask.dtype == torch.bool:
            scores.allowed = ~mask if scores.allowed is None else scores.allowed & ~mask
        else:
            scores.additive = mask if scores.additive is None else scores.additive + mask

    kpm = a.get("key_padding_mask")
    if kpm is not None:
        add(kpm, (B, 1, 1, S))
    attn_mask = a.get("attn_mask")
    if attn_mask is not None:
        add(attn_mask, (B, H, L, S) if attn_mask.ndim == 3 else (1, 1, L, S))
    scores.causal = bool(a.get("is_causal")) and attn_mask is None
    return scores


class MultiheadAttentionInputs:
    """Hooks ``nn.MultiheadAttention`` modules (not those inside an encoder layer)."""

    def __init__(self, probe, sdpa) -> None:
        self.probe, self.sdpa = probe, sdpa

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention)

    def attach(self, path: str, module, hooks) -> None:
        hooks.forward_pre(module, functools.partial(self._enter, path))
        hooks.forward(module, self._leave, always_call=True)

    def _enter(self, path, module, args, kwargs) -> None:
        if self.probe._active:
            self.sdpa.suppress += 1  # its internal SDPA call is this same attention
            self.probe.guarded(self._record, path, module, args, kwargs)

    def _record(self, path, module, args, kwargs) -> None:
        scores = mha_scores(self.probe, path, module, bind(_ARGS, args, kwargs))
        self.probe.record(scores, Call(path, module, args, kwargs), scores.q.device)

    def _leave(self, module, args, kwargs, output) -> None:
        if self.sdpa.suppress:
            self.sdpa.suppress -= 1
