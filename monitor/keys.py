"""Metric keys: built and parsed here, nowhere else.

A probe's metric is logged as ``[<prefix>/]collapse/<probe>/[<layer>/]<metric>[/<index>]``:

- ``probe``: the probe's name (one segment: no ``/``; not a reserved word);
- ``layer``: for per-layer probes, the module path the value belongs to;
- ``metric``: one segment, e.g. ``nc1``, ``entropy_norm``, ``kl``;
- ``index``: an element of a per-head or per-dimension metric, ``head_3`` or ``dim_5``;
- ``prefix``: a validation snapshot's prefix, ``val``;
- ``loader``: with several validation dataloaders, ``.../dataloader_idx_<i>`` at the end
  (Lightning's convention).

The monitor's own counters are ``collapse/alerts/<rule>``, ``collapse/mitigations/<name>`` and
``collapse/errors``; their names are not probe names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

ROOT = "collapse"
RESERVED = ("alerts", "mitigations", "errors")
_INDEX = re.compile(r"^(head|dim)_\d+$")
_LOADER = re.compile(r"^dataloader_idx_(\d+)$")


def check_name(name: str, what: str = "probe name") -> str:
    """``name`` if it can be one segment of a key; a clear ``ValueError`` otherwise."""
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"{what} must be a non-empty string without '/', got {name!r}")
    if what == "probe name" and name in RESERVED:
        raise ValueError(f"{what} {name!r} is reserved for the monitor's own keys {RESERVED}")
    return name


@dataclass(frozen=True)
class MetricKey:
    """One logged value's key (see the module docstring).

    Example:
        >>> str(MetricKey("attn", "entropy_norm", layer="blocks.0.attn", index="head_2"))
        'collapse/attn/blocks.0.attn/entropy_norm/head_2'
        >>> MetricKey.parse("val/collapse/head/nc1")
        MetricKey(probe='head', metric='nc1', layer=None, index=None, prefix='val', loader=None)
    """

    probe: str
    metric: str
    layer: str | None = None
    index: str | None = None
    prefix: str | None = None
    loader: int | None = None

    def __post_init__(self) -> None:
        if self.probe in RESERVED:
            return  # the monitor's counters: ``metric`` is a rule or mitigation name
        check_name(self.probe)
        check_name(self.metric, "metric name")
        if self.layer is not None:
            check_name(self.layer, "layer name")
        if self.index is not None and not _INDEX.match(self.index):
            raise ValueError(f"index must look like 'head_<h>' or 'dim_<j>', got {self.index!r}")

    def __str__(self) -> str:
        loader = None if self.loader is None else f"dataloader_idx_{self.loader}"
        parts = [self.prefix, ROOT, self.probe, self.layer, self.metric, self.index, loader]
        return "/".join(p for p in parts if p)

    def with_prefix(self, prefix: str | None, loader: int | None = None) -> MetricKey:
        """This key in an evaluation snapshot: under ``prefix`` and, when given, keyed by the
        evaluation dataloader ``loader`` (both replace the key's own)."""
        return replace(self, prefix=prefix, loader=loader)

    @property
    def is_probe_metric(self) -> bool:
        return self.probe not in RESERVED

    @classmethod
    def parse(cls, text: str) -> MetricKey:
        """The key of a logged tag; ``ValueError`` for a tag that is not one of ours."""
        parts = text.split("/")
        prefix = None
        if parts and parts[0] != ROOT:
            prefix, parts = parts[0], parts[1:]
        if len(parts) < 2 or parts[0] != ROOT:
            raise ValueError(f"not a collapse-monitor key: {text!r}")
        probe, rest = parts[1], parts[2:]
        loader = None
        if rest and _LOADER.match(rest[-1]):
            loader = int(_LOADER.match(rest.pop()).group(1))
        if probe in RESERVED:
            return cls(probe, "/".join(rest), prefix=prefix, loader=loader)
        index = rest.pop() if len(rest) >= 2 and _INDEX.match(rest[-1]) else None
        if len(rest) not in (1, 2):
            raise ValueError(f"not a collapse-monitor key: {text!r}")
        layer = rest[0] if len(rest) == 2 else None
        return cls(probe, rest[-1], layer, index, prefix, loader)


def key_pattern(probe_pattern: str, metric_pattern: str) -> str:
    """A glob over the keys of the probes matching ``probe_pattern``, e.g.
    ``key_pattern("*", "*/entropy_norm")`` for the per-layer ``entropy_norm`` of any probe."""
    return f"{ROOT}/{probe_pattern}/{metric_pattern}"


def alerts_key(rule: str) -> str:
    return str(MetricKey("alerts", rule))


def mitigations_key(name: str) -> str:
    return str(MetricKey("mitigations", name))


ERRORS_KEY = f"{ROOT}/errors"
