"""FlexAttention calls (``torch.nn.attention.flex_attention``, ``transformers``'
``attn_implementation="flex_attention"``): the call's ``score_mod`` and ``BlockMask`` applied to
the sampled query rows, as the kernel applies them.

``flex_attention`` reaches the probe's function mode as its higher-order operator, with the
block mask as a tuple (``BlockMask.as_tuple()``). A key is attended where the block mask holds
its block (partial or full) and, as in PyTorch's eager reference (``math_attention``), where
``mask_mod`` allows it; the logits are ``score_mod(q k' * scale, b, h, q_idx, kv_idx)``. Both
functions are vectorised over the sampled rows the way PyTorch does it (nested ``vmap`` with
tensor indexing turned into ``index``). These helpers are PyTorch's own (private) ones: a
PyTorch without them, or with another tuple layout, is refused with a message naming what it
lacks.
"""

from __future__ import annotations

import functools

import torch

try:  # the operator flex_attention calls, as the function mode sees it
    from torch._higher_order_ops.flex_attention import flex_attention as FLEX_ATTENTION
except ImportError:  # torch < 2.5
    FLEX_ATTENTION = None

#: the flattened ``BlockMask.as_tuple()``: 2 sequence lengths, kv_num_blocks, kv_indices,
#: full_kv_num_blocks, full_kv_indices, ..., Q_BLOCK_SIZE, KV_BLOCK_SIZE, mask_mod
_Q_BLOCK, _KV_BLOCK, _MASK_MOD = -3, -2, -1


@functools.cache
def _vectorised():
    """PyTorch's ``vmap`` over ``(b, h, q_idx, kv_idx)`` and its getitem-to-index transform.

    Raises:
        ValueError: this PyTorch lacks them.
    """
    try:
        from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex
        from torch.nn.attention.flex_attention import _vmap_for_bhqkv
    except ImportError as exc:
        raise ValueError(
            f"flex_attention: this PyTorch lacks the helpers its eager flex_attention uses "
            f"({exc}); the probe cannot apply score_mod/mask_mod"
        ) from None
    return _vmap_for_bhqkv, TransformGetItemToIndex


class FlexCall:
    """One ``flex_attention`` call's score and mask modifications, for sampled query rows.

    Args:
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx, *buffers)``.
        block: the block mask as the operator received it (``BlockMask.as_tuple()``).
        score_buffers, mask_buffers: the extra tensors each function takes (traced calls).

    Raises:
        ValueError: a block mask tuple of a layout the probe does not read; a PyTorch without
            the helpers (at the first use).
    """

    def __init__(self, score_mod, block: tuple, score_buffers=(), mask_buffers=()) -> None:
        if (
            not isinstance(block, tuple)
            or len(block) < 9
            or not callable(block[_MASK_MOD])
            or not all(isinstance(block[i], int) for i in (0, 1, _Q_BLOCK, _KV_BLOCK))
            or not all(isinstance(t, torch.Tensor) for t in block[2:4])
            or not all(t is None or isinstance(t, torch.Tensor) for t in block[4:6])
        ):
            raise ValueError(
                "flex_attention: a block mask of a layout this probe does not read "
                f"({len(block) if isinstance(block, tuple) else type(block).__name__} parts)"
            )
        self.score_mod, self.block = score_mod, block
        self.score_buffers, self.mask_buffers = tuple(score_buffers), tuple(mask_buffers)
        self._held: torch.Tensor | None = None  # the block mask, dense (made at first use)

    def scores(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``score_mod`` applied to ``logits`` ``(B, H, R, S)``, the scaled ``q k'`` of the
        query positions ``rows`` (``(R,)`` int64); the same shape and dtype."""
        vmap, index = _vectorised()
        fn = vmap(self.score_mod, prefix=(0,), suffix=(None,) * len(self.score_buffers))
        with index():
            out = fn(logits, *_indices(logits, rows), *self.score_buffers)
        return out.to(logits.dtype)

    def allowed(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Bool ``(B, H, R, S)``: the keys each of the query positions ``rows`` (``(R,)``
        int64) attends, for ``logits`` ``(B, H, R, S)``."""
        vmap, index = _vectorised()
        fn = vmap(self.block[_MASK_MOD], prefix=(), suffix=(None,) * len(self.mask_buffers))
        b, h, m, n = _indices(logits, rows)
        with index():
            ok = fn(b, h, m, n, *self.mask_buffers).to(torch.bool)
        held = self._blocks()[:, :, m // self.block[_Q_BLOCK]][:, :, :, n // self.block[_KV_BLOCK]]
        return ok & held.expand(logits.shape[0], logits.shape[1], -1, -1)

    def _blocks(self) -> torch.Tensor:
        """``(B or 1, H or 1, Q blocks, KV blocks)``: whether the mask holds a (query block, key
        block), partial or full."""
        if self._held is None:
            block = self.block
            width = -(-block[1] // block[_KV_BLOCK])  # the key length in blocks
            held = _dense(block[2], block[3], width)
            if block[4] is not None and block[5] is not None:
                held = held | _dense(block[4], block[5], width)
            self._held = held
        return self._held


def _indices(logits: torch.Tensor, rows: torch.Tensor):
    """``(b, h, q_idx, kv_idx)`` index vectors of ``logits`` ``(B, H, R, S)`` at ``rows``."""
    B, H, _, S = logits.shape
    device = logits.device
    arange = functools.partial(torch.arange, device=device)
    return arange(B), arange(H), rows.to(device), arange(S)


def _dense(num: torch.Tensor, indices: torch.Tensor, width: int) -> torch.Tensor:
    """``(B, H, Q blocks, width)`` bool from each block row's count and key-block indices."""
    kept = torch.arange(indices.shape[-1], device=indices.device) < num[..., None]
    dense = torch.zeros(*indices.shape[:-1], width + 1, dtype=torch.bool, device=indices.device)
    # the indices past a row's count point at a spare column, dropped after
    dense.scatter_(-1, torch.where(kept, indices.long(), width), True)
    return dense[..., :width]
