"""The ``Example:`` sections of the public docstrings run (doctest)."""

import doctest
import importlib
import pkgutil

import pytest

import collapse_monitor

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(collapse_monitor.__path__, "collapse_monitor.")
    if ".integrations." not in m.name or m.name.endswith(("tensorboard", "lightning"))
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_the_examples_cover_the_public_building_blocks():
    from collapse_monitor import CollapseMonitor, MetricKey, RuleSpec, stats

    for obj in (
        CollapseMonitor,
        MetricKey,
        RuleSpec,
        stats.ClassMoments,
        stats.Moments,
        stats.CodeCounts,
        stats.LogitSums,
        stats.Window,
    ):
        assert "Example:" in obj.__doc__ and ">>>" in obj.__doc__, obj
