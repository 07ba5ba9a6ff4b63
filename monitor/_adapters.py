"""The linear map a layer applies, adapters included: an ``nn.Linear``, or a PEFT LoRA layer
(``W0 + scaling B A``), read from the layer as the model runs it; anything else refused."""

from __future__ import annotations

import sys

import torch
from torch import nn

from ._sharding import whole


def lora_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a PEFT LoRA ``Linear`` (its ``base_layer`` holds ``W0``)."""
    if "peft" not in sys.modules:  # (no model holds one before peft is imported)
        return False
    from peft.tuners.lora.layer import Linear

    return isinstance(module, Linear)


def tuner_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a PEFT adapter layer of any kind (LoRA, IA3, VeRA, ...)."""
    if "peft" not in sys.modules:
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def adapted_path(path: str, named: dict[str, nn.Module]) -> str:
    """The user's name of a layer a PEFT adapter wraps: ``"<layer>.base_layer"`` is
    ``"<layer>"`` when ``"<layer>"`` is the adapter (the model runs the layer through it)."""
    parent, _, leaf = path.rpartition(".")
    return parent if leaf == "base_layer" and tuner_layer(named.get(parent)) else path


def applied(module: nn.Module) -> nn.Module:
    """The module a PEFT ``ModulesToSaveWrapper`` runs now (its trained copy of the active
    adapter, or the original while adapters are disabled); any other module itself."""
    if "peft" not in sys.modules:
        return module
    from peft.utils.other import ModulesToSaveWrapper

    if not isinstance(module, ModulesToSaveWrapper):
        return module
    active = module.active_adapter
    active = active[0] if isinstance(active, (list, tuple)) else active
    if module.disable_adapters or active not in module.modules_to_save:
        return module.original_module
    return module.modules_to_save[active]


def refuse_adapted(named: dict[str, nn.Module], paths, who: str) -> None:
    """Raise when a module of ``paths`` is a PEFT adapter layer or lies inside one (its
    ``base_layer``, ``lora_A``, ...): a mitigation that rewrites such a weight would change a part
    of the map the layer applies, never the map itself.

    Args:
        named: the model's modules by name (:func:`~collapse_monitor._modules.named_modules`).
        paths: the names the mitigation would change.
        who: the mitigation, for the message.

    Raises:
        ValueError: naming the first adapted module found.
    """
    adapted = [n for n, m in named.items() if tuner_layer(m)]
    for path in paths:
        inside = [a for a in adapted if path == a or path.startswith(a + ".")]
        if inside:
            raise ValueError(
                f"{who}: '{path}' is part of the PEFT adapter layer '{inside[0]}', whose map is "
                "its base weight plus the adapters': merge the adapters first "
                "(merge_and_unload) or apply it before get_peft_model"
            )


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear``, a PEFT LoRA ``Linear`` around one, or a PEFT adapter layer (refused
    by :func:`linear_parts` with a message, never silently passed over)."""
    module = applied(module)
    return isinstance(module, nn.Linear) or tuner_layer(module)


def linear_parts(
    module: nn.Module, what: str, gather: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[torch.Tensor, torch.Tensor]]]:
    """``(W (out, in), b (out,) or None, [(U (in, r), B (out, r)), ...])``, detached, such that
    the layer maps ``x`` to ``x W' + b + sum (x U) B'``: an ``nn.Linear``'s weight and bias, or
    a LoRA layer's base weight and one low-rank term per active, unmerged adapter
    (``U = scaling A'``; dropout is the identity in expectation). ``gather``: FSDP2 shards made
    whole (a collective), and DeepSpeed ZeRO-3 partitions gathered; else they are returned as
    they are (a ZeRO-3 partition outside its forward is empty: its ``ds_shape`` is kept).

    Raises:
        ValueError: a layer whose map is not of that form (DoRA and other LoRA variants,
            ``fan_in_fan_out``, a LoRA bias, other adapters), naming ``what``.
    """

    def read(t: torch.Tensor) -> torch.Tensor:
        out = (whole(t) if gather else t).detach()
        if hasattr(t, "ds_shape") and not gather:  # a ZeRO-3 partition: its whole shape
            out.ds_shape = t.ds_shape
        return out

    module = applied(module)
    if isinstance(module, nn.Linear):
        return read(module.weight), None if module.bias is None else read(module.bias), []
    if not lora_layer(module) or not isinstance(module.base_layer, nn.Linear):
        kind = f"{type(module).__module__}.{type(module).__name__}"
        raise ValueError(
            f"{what} is a {kind}: expected an nn.Linear or a PEFT LoRA layer around one (other "
            "adapters and layers are not read as they apply: probe the layer's output)"
        )
    base = module.base_layer
    weight, bias = read(base.weight), None if base.bias is None else read(base.bias)
    terms = []
    if module.merged or module.disable_adapters:  # W0 holds the deltas, or none applies
        return weight, bias, terms
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        A, B = module.lora_A[name], module.lora_B[name]
        odd = [
            flag
            for flag, on in (
                ("use_dora", module.use_dora.get(name, False)),
                ("a LoRA variant", getattr(module, "lora_variant", {}).get(name) is not None),
                ("fan_in_fan_out", module.fan_in_fan_out),
                ("lora_bias", B.bias is not None),
                ("a non-linear lora_A", not isinstance(A, nn.Linear)),
            )
            if on
        ]
        if odd:
            raise ValueError(
                f"{what} is a LoRA layer whose adapter '{name}' has {', '.join(odd)}: its map is "
                "not W0 + scaling B A; probe the layer's output, or merge the adapter "
                "(merge_and_unload) first"
            )
        terms.append((read(A.weight).T * module.scaling[name], read(B.weight)))
    return weight, bias, terms


def effective_weight(module: nn.Module, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W (out, in), b)`` of the map the layer applies, whole (:func:`linear_parts` gathered,
    its low-rank terms added in: ``O(out * in * r)``)."""
    weight, bias, terms = linear_parts(module, what, gather=True)
    for U, B in terms:
        weight = weight + (B.to(weight.dtype) @ U.T.to(weight.dtype))
    return weight, bias
