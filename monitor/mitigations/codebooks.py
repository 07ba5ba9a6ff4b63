"""Finding a quantiser's codebook among its parameters and buffers (dead-code resets, SimVQ)."""

from __future__ import annotations

import torch
from torch import nn

from .._sharding import shape_of

_CODEBOOK_NAMES = ("embed", "codebook", "embedding", "embeddings", "weight")
# vector-quantize-pytorch's quantisers without a learned codebook: a code is a pattern of the
# input's own coordinates (the signs for LFQ, rounded levels for FSQ); the tensors they hold are
# fixed tables (LFQ's feeds its entropy loss), which a reset would corrupt without moving a code
_IMPLICIT = ("FSQ", "LFQ", "LatentQuantize", "ResidualFSQ", "ResidualLFQ")


def find_codebook(
    mod: nn.Module, name: str | None, num_codes: int | None, owner: str, path: str
) -> tuple[str, torch.Tensor]:
    """The codebook of the quantiser ``mod`` (at ``path``), as ``(name relative to mod,
    tensor)``: ``name`` (an ``nn.Embedding`` submodule, a parameter or a buffer); by default the
    only ``nn.Embedding`` inside, else the one parameter or buffer named
    ``embed``/``codebook``/``embedding``/``embeddings`` (or ``weight``, when ``num_codes``
    is given) shaped ``(K, D)`` or ``(H, K, D)`` with ``K = num_codes``.

    Raises:
        ValueError: ``mod`` is (or holds) a quantiser without a learned codebook
            (vector-quantize-pytorch's FSQ, LFQ, LatentQuantize and their residual forms), or
            the codebook is ambiguous; KeyError: ``name`` is not in ``mod``."""
    for sub_path, sub in mod.named_modules():
        kind = type(sub).__name__
        if kind in _IMPLICIT and type(sub).__module__.startswith("vector_quantize_pytorch"):
            where = f"'{path}.{sub_path}'" if sub_path else f"'{path}'"
            raise ValueError(
                f"{owner}: {where} is vector-quantize-pytorch's {kind}, whose codes are fixed "
                "patterns of its input's coordinates, not a learned codebook: nothing to reset "
                "or reparametrise (its tables are constants; LFQ's feed its entropy loss). Its "
                "codes stay unused while the encoder's outputs never take their patterns: raise "
                "LFQ's entropy_loss_weight, or give FSQ fewer levels"
            )
    tensors = {}
    for n, t in [*mod.named_parameters(), *mod.named_buffers()]:
        head, sep, tail = n.partition("parametrizations.")
        if not sep:
            tensors[n] = t
        elif tail.endswith(".original"):  # a parametrized tensor, under its own name
            tensors[head + tail.removesuffix(".original")] = t
    if name is not None:
        subs = dict(mod.named_modules())
        if name in subs and isinstance(subs[name], nn.Embedding):
            return name + ".weight", tensors[name + ".weight"]
        if name in tensors:
            return name, tensors[name]
        raise KeyError(
            f"{owner}: no nn.Embedding, parameter or buffer '{name}' in '{path}'; it has "
            f"{sorted(tensors)}"
        )
    embeddings = [(n, m) for n, m in mod.named_modules() if isinstance(m, nn.Embedding)]
    if len(embeddings) == 1:
        path_ = (embeddings[0][0] + "." if embeddings[0][0] else "") + "weight"
        return path_, tensors[path_]  # a parametrized weight: its original parameter
    shaped = [  # (the whole shape of a ZeRO-3 partition)
        n
        for n, t in tensors.items()
        if len(shape_of(t)) in (2, 3) and (num_codes is None or shape_of(t)[-2] == num_codes)
    ]
    # a plain "weight" only when the code count tells it from a projection's
    for wanted in _CODEBOOK_NAMES if num_codes is not None else _CODEBOOK_NAMES[:-1]:
        named = [n for n in shaped if n.rsplit(".", 1)[-1] == wanted]
        if len(named) == 1:
            return named[0], tensors[named[0]]
    K = "K" if num_codes is None else num_codes
    raise ValueError(
        f"{owner}: cannot tell which tensor of '{path}' is the codebook (candidates shaped "
        f"(..., {K}, D): {shaped}); pass codebook='<name>'"
    )


def holders_outside(model: nn.Module, mod: nn.Module, tensor: torch.Tensor) -> list[str]:
    """The paths (torch's names) outside ``mod`` at which the module holding ``tensor`` inside
    ``mod`` is registered too: a codebook module shared between quantizers
    (``ResidualVQ(shared_codebook=True)``), whose other users' codes ``mod``'s usage does not
    show. (A tensor tied into another module, an embedding, is no user of the codebook.)"""
    owners = {
        id(m)
        for m in mod.modules()
        if any(t is tensor for t in (*m._parameters.values(), *m._buffers.values()))
    }
    named = list(model.named_modules(remove_duplicate=False))
    roots = [p for p, m in named if m is mod]
    return [
        p
        for p, m in named
        if id(m) in owners and not any(r == "" or p == r or p.startswith(r + ".") for r in roots)
    ]
