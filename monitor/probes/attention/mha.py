"""Attention source 2: ``nn.MultiheadAttention``, recomputed from the module's inputs and its
projection weights (its fast path and its internal calls skip Python-level hooks).

``key_padding_mask`` and ``attn_mask`` follow PyTorch's convention (True or ``-inf`` = masked).
``is_causal`` is PyTorch's hint that ``attn_mask`` is the causal mask: the mask is read. Without
one PyTorch raises on its slow path and attends to every key on its fast path (eval mode, no
autograd), which is then what is read. Query padding: in self-attention (the query
is the key) the key padding marks the padded queries too; inside an ``nn.TransformerDecoderLayer``
the layer's ``tgt_key_padding_mask`` marks the queries of both its self- and its
cross-attention (whose key padding is the memory's).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ...functional.attention import attendable
from ...reading import Call, unnested
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
_DECODER_ARGS = ("tgt", "memory", "tgt_mask", "memory_mask", "tgt_key_padding_mask")


def _padding(mask: torch.Tensor | None, shape) -> torch.Tensor | None:
    """A key padding mask (True, or a bias that masks: -inf, -1e4, ...) as ``(B, L)`` bool,
    true for real positions."""
    if mask is None:
        return None
    mask = mask.detach().reshape(shape)
    return ~mask if mask.dtype == torch.bool else attendable(None, mask)


def mha_scores(
    call: Call, mha: nn.MultiheadAttention, a: dict, queries: torch.Tensor | None = None
) -> Scores:
    """The q, k and masks of one ``nn.MultiheadAttention`` call, from its bound arguments;
    ``queries (B, L)``: real query positions when the caller knows them."""
    if mha.bias_k is not None or mha.add_zero_attn:
        raise call.error("add_bias_kv and add_zero_attn are not supported; pass extract=")
    query, key = a["query"], a["key"]
    self_attention = query is key
    if query.is_nested or key.is_nested:
        if not self_attention or a.get("key_padding_mask") is not None:
            raise call.error(
                "nested-tensor inputs are read for self-attention without a key_padding_mask "
                "only (else: TransformerEncoder(enable_nested_tensor=False))"
            )
        query, real = unnested(query)
        key, a = query, {**a, "key_padding_mask": ~real}
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
    if queries is None and self_attention:
        queries = _padding(kpm, (B, L))
    scores.queries = queries
    return scores


class MultiheadAttentionInputs:
    """Hooks ``nn.MultiheadAttention`` modules (not those inside an encoder layer), and the
    decoder layers whose target padding their queries follow."""

    def __init__(self, recorder, sdpa) -> None:
        self.recorder, self.sdpa = recorder, sdpa
        self.decoder_padding: list[torch.Tensor | None] = []  # of the decoder layers running

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, (nn.MultiheadAttention, nn.TransformerDecoderLayer))

    def attach(self, path: str, module, hooks) -> None:
        if isinstance(module, nn.TransformerDecoderLayer):
            hooks.forward_pre(module, self._enter_decoder)
            hooks.forward(module, self._leave_decoder, always_call=True)
            self.sdpa.attach(path, module, hooks)  # its own SDPA calls, if any, are its layers'
            return
        hooks.forward_pre(module, functools.partial(self._enter, path))
        hooks.forward(module, self._leave, always_call=True)

    def _enter(self, path, module, args, kwargs) -> None:
        if self.recorder.active:
            self._begin(path, module, args, kwargs)

    def _leave(self, module, args, kwargs, output) -> None:
        if self.sdpa.suppress:
            self._end()

    @torch.compiler.disable
    def _begin(self, path, module, args, kwargs) -> None:
        self.sdpa.suppress += 1  # its internal SDPA call is this same attention
        self.recorder.guarded(self._record, path, module, args, kwargs)

    @torch.compiler.disable
    def _end(self) -> None:
        self.sdpa.suppress -= 1

    def _enter_decoder(self, module, args, kwargs) -> None:
        if self.recorder.active:
            self._push_decoder(args, kwargs)

    def _leave_decoder(self, module, args, kwargs, output) -> None:
        if self.decoder_padding:
            self._pop_decoder()

    @torch.compiler.disable
    def _push_decoder(self, args, kwargs) -> None:
        self.decoder_padding.append(bind(_DECODER_ARGS, args, kwargs).get("tgt_key_padding_mask"))

    @torch.compiler.disable
    def _pop_decoder(self) -> None:
        self.decoder_padding.pop()

    def _record(self, path, module, args, kwargs) -> None:
        a = bind(_ARGS, args, kwargs)
        queries = None
        if self.decoder_padding and self.decoder_padding[-1] is not None:
            query = a["query"]
            batch_first = module.batch_first or query.ndim == 2
            B, L = (query.shape[0], query.shape[1]) if batch_first else query.shape[1::-1]
            queries = _padding(self.decoder_padding[-1], (B, L) if query.ndim == 3 else (1, L))
        call = self.recorder.call(path, module, args, kwargs)
        scores = mha_scores(call, module, a, queries)
        self.recorder.record(scores, call, scores.q.device)
