"""Resolving module paths and globs against a model's module names, wrappers left out."""

from __future__ import annotations

import difflib
import fnmatch

from torch import nn

# the attribute under which a wrapper keeps the module it wraps: FSDP (first generation),
# activation checkpointing, torch.compile (OptimizedModule); DDP's ``module`` is only a wrapper
# segment under DistributedDataParallel / DataParallel
_WRAPPER_ATTRIBUTES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")
_DATA_PARALLEL = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def named_modules(model: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """``model.named_modules()`` under the names the unwrapped model gives them: the segments
    that FSDP, activation checkpointing, ``torch.compile`` and DDP insert are dropped, and a name
    a wrapper shares with the module it wraps names the wrapped module. ``prefix`` is the
    model's own name."""
    out: dict[str, nn.Module] = {}
    seen: set[int] = set()

    def visit(module: nn.Module, name: str) -> None:
        if id(module) in seen:  # a module shared by two parents is listed once, as torch does
            return
        seen.add(id(module))
        out[name] = module  # a wrapper's inner module, visited next, takes over its name
        wrapper = isinstance(module, _DATA_PARALLEL)
        for attr, child in module.named_children():
            if attr in _WRAPPER_ATTRIBUTES or (wrapper and attr == "module"):
                visit(child, name)
            else:
                visit(child, f"{name}.{attr}" if name else attr)

    visit(model, prefix)
    return out


def resolve_modules(model: nn.Module, pattern: str, owner: str = "") -> list[tuple[str, nn.Module]]:
    """Modules whose name (see :func:`named_modules`) equals ``pattern`` or matches it as a glob.

    Raises:
        KeyError: nothing matches; the message lists the closest existing names.
    """
    named = named_modules(model)
    if pattern in named:
        return [(pattern, named[pattern])]
    hits = [(n, m) for n, m in named.items() if n and fnmatch.fnmatchcase(n, pattern)]
    if hits:
        return hits
    names = [n for n in named if n]
    close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.3) or names[:10]
    who = f"{owner}: " if owner else ""
    raise KeyError(
        f"{who}no module named or matching '{pattern}' in {type(model).__name__}; "
        f"closest names: {close}"
    )
