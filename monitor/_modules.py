"""Resolving module paths and globs against ``model.named_modules()``."""

from __future__ import annotations

import difflib
import fnmatch

from torch import nn


def resolve_modules(model: nn.Module, pattern: str, owner: str = "") -> list[tuple[str, nn.Module]]:
    """Modules whose ``named_modules()`` name equals ``pattern`` or matches it as a glob.

    Raises:
        KeyError: nothing matches; the message lists the closest existing names.
    """
    named = dict(model.named_modules())
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
