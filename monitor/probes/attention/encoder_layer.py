"""Attention source 3: ``nn.TransformerEncoderLayer``, whose fast path runs its self-attention
without calling the ``nn.MultiheadAttention`` module's Python forward: the scores are recomputed
from the layer's input (after ``norm1`` for pre-norm layers), ``src_mask``,
``src_key_padding_mask`` (which also marks the padded queries) and ``is_causal``. A nested
``src`` (``nn.TransformerEncoder``'s fast path in eval mode, which drops the padding) is read
padded again, its padding masked."""

from __future__ import annotations

from torch import nn

from ...reading import unnested
from .mha import MultiheadAttentionInputs, mha_scores
from .scores import bind

_ARGS = ("src", "src_mask", "src_key_padding_mask", "is_causal")


class EncoderLayerInputs(MultiheadAttentionInputs):
    """Hooks ``nn.TransformerEncoderLayer`` modules; their ``self_attn`` is not hooked again."""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        # (a self_attn wrapped by an adapter, PEFT's LoRA, runs its own forward: the
        # nn.MultiheadAttention inside is then hooked as it runs, with the adapted weights)
        return isinstance(module, nn.TransformerEncoderLayer) and isinstance(
            module.self_attn, nn.MultiheadAttention
        )

    @staticmethod
    def covers(module: nn.Module) -> list[nn.Module]:
        """Submodules this source already accounts for."""
        return [module.self_attn]

    def _record(self, path, layer, args, kwargs) -> None:
        a = bind(_ARGS, args, kwargs)
        src, padding = a["src"], a.get("src_key_padding_mask")
        if src.is_nested:  # TransformerEncoder's fast path (eval): the padding dropped
            src, real = unnested(src)
            padding = ~real
        x = layer.norm1(src) if layer.norm_first else src
        attn_path = path + ".self_attn"
        inputs = {
            "query": x,
            "key": x,  # the same tensor: self-attention, padded keys are padded queries
            "key_padding_mask": padding,
            "attn_mask": a.get("src_mask"),
            "is_causal": a.get("is_causal", False),
        }
        call = self.recorder.call(attn_path, layer.self_attn, args, kwargs)
        scores = mha_scores(call, layer.self_attn, inputs)
        self.recorder.record(scores, call, scores.q.device)
