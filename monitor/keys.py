"""Metric keys: built here, and parsed here only from text read back from a file.

A probe's metric is logged as ``[<prefix>/]collapse/<probe>/[<layer>/]<metric>[/<index>]``:

- ``probe``: the probe's name (one segment: no ``/``; not a reserved word);
- ``layer``: for per-layer probes, the module path the value belongs to;
- ``metric``: one segment, e.g. ``nc1``, ``entropy_norm``, ``kl``;
- ``index``: an element of a per-head or per-dimension metric, ``head_3`` or ``dim_5``;
- ``prefix``: a validation snapshot's prefix, ``val``;
- ``loader``: with several validation dataloaders, ``.../dataloader_idx_<i>`` at the end
  (Lightning's convention).

The monitor's own counters are ``collapse/alerts/<rule>``, ``collapse/mitigations/<name>``,
``collapse/errors`` and ``collapse/outlet_errors/<outlet>``; their names are not probe names.
No key is a path prefix of another one the same monitor logs, but a per-head or per-dimension
element of a metric (``.../entropy_norm/head_0`` below ``.../entropy_norm``); sinks whose
stores are folders (MLflow's file store) write those as ``.../entropy_norm.head_0``.

A :class:`MetricKey` is a ``str`` (its tag), so the metrics the monitor returns and hands to
sinks are plain ``{tag: value}`` dictionaries to anyone who wants one, while the sinks and
mitigations read the parts (``key.probe``, ``key.layer``, ...) without parsing the tag.
"""

from __future__ import annotations

import re

ROOT = "collapse"
RESERVED = ("alerts", "mitigations", "errors", "outlet_errors")
_INDEX = re.compile(r"^(head|dim)_\d+$")
_LOADER = re.compile(r"^dataloader_idx_(\d+)$")
_FIELDS = ("probe", "metric", "layer", "index", "prefix", "loader")


def check_name(name: str, what: str = "probe name") -> str:
    """``name`` if it can be one segment of a key; a clear ``ValueError`` otherwise."""
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"{what} must be a non-empty string without '/', got {name!r}")
    if what == "probe name" and name in RESERVED:
        raise ValueError(f"{what} {name!r} is reserved for the monitor's own keys {RESERVED}")
    return name


class MetricKey(str):
    """One logged value's key (see the module docstring): a ``str`` holding the tag (and shown
    as one), with the parts it was made of as read-only attributes.

    Example:
        >>> key = MetricKey("attn", "entropy_norm", layer="blocks.0.attn", index="head_2")
        >>> key, key.layer
        ('collapse/attn/blocks.0.attn/entropy_norm/head_2', 'blocks.0.attn')
        >>> {key: 1.0}["collapse/attn/blocks.0.attn/entropy_norm/head_2"]
        1.0
        >>> MetricKey.parse("val/collapse/head/nc1").fields
        ('head', 'nc1', None, None, 'val', None)
    """

    probe: str
    metric: str
    layer: str | None
    index: str | None
    prefix: str | None
    loader: int | None

    def __new__(
        cls,
        probe: str,
        metric: str,
        layer: str | None = None,
        index: str | None = None,
        prefix: str | None = None,
        loader: int | None = None,
    ) -> MetricKey:
        if probe not in RESERVED:  # (the monitor's counters: ``metric`` is a rule's name)
            check_name(probe)
            check_name(metric, "metric name")
            if layer is not None:
                check_name(layer, "layer name")
            if index is not None and not _INDEX.match(index):
                raise ValueError(f"index must look like 'head_<h>' or 'dim_<j>', got {index!r}")
        tail = None if loader is None else f"dataloader_idx_{loader}"
        parts = (prefix, ROOT, probe, layer, metric, index, tail)
        key = super().__new__(cls, "/".join(p for p in parts if p))
        for name, value in zip(_FIELDS, (probe, metric, layer, index, prefix, loader)):
            object.__setattr__(key, name, value)
        return key

    def __setattr__(self, name, value) -> None:
        raise AttributeError("MetricKey is immutable")

    def __reduce__(self):
        return MetricKey, self.fields

    @property
    def fields(self) -> tuple:
        """``(probe, metric, layer, index, prefix, loader)``."""
        return tuple(getattr(self, n) for n in _FIELDS)

    def but(self, **changes) -> MetricKey:
        """This key with some parts changed, e.g. ``key.but(layer="blocks.1")``."""
        return MetricKey(**{**dict(zip(_FIELDS, self.fields)), **changes})

    def with_prefix(self, prefix: str | None, loader: int | None = None) -> MetricKey:
        """This key in an evaluation snapshot: under ``prefix`` and, when given, keyed by the
        evaluation dataloader ``loader`` (both replace the key's own)."""
        return self.but(prefix=prefix, loader=loader)

    @property
    def is_probe_metric(self) -> bool:
        return self.probe not in RESERVED

    @property
    def series(self) -> MetricKey:
        """The key of the metric this one is an element of (its ``index`` dropped)."""
        return self.but(index=None, loader=None)

    @classmethod
    def parse(cls, text: str) -> MetricKey:
        """The key of a tag read back from a file; ``ValueError`` for a tag not of ours."""
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


def layer_name(path: str) -> str:
    """A module path as a key's layer: ``"model"`` for the root module (path ``""``)."""
    return path or "model"


def key_pattern(probe_pattern: str, metric_pattern: str) -> str:
    """A glob over the keys of the probes matching ``probe_pattern``, e.g.
    ``key_pattern("*", "*/entropy_norm")`` for the per-layer ``entropy_norm`` of any probe."""
    return f"{ROOT}/{probe_pattern}/{metric_pattern}"


def alerts_key(rule: str) -> MetricKey:
    return MetricKey("alerts", rule)


def mitigations_key(name: str) -> MetricKey:
    return MetricKey("mitigations", name)


def outlet_errors_key(outlet: str) -> MetricKey:
    return MetricKey("outlet_errors", outlet)


ERRORS_KEY = MetricKey("errors", "")
OVERHEAD_KEY = MetricKey("monitor", "overhead")  # an overhead budget's measure
