"""Window: a probe's statistics together (entries made on first use, persistent and per-step
ones, one part per module of a glob), reduced over ranks as one."""

import pytest
import torch

from collapse_monitor.stats import CodeCounts, Counter, UsageEMA, Window, WindowView


def test_entries_are_made_on_first_use_on_the_windows_device():
    w = Window(factory=lambda key: Counter(("n",)))
    w["a"].add("n", 2)
    assert list(w) == ["a"] and w["a"].counts.device == w.device
    with pytest.raises(KeyError, match="no statistic 'b'"):
        Window({"a": Counter(("n",))})["b"]


def test_reset_keeps_persistent_entries_and_a_snapshot_shares_them():
    w = Window({"counts": CodeCounts(1, 3), "ema": UsageEMA(1, 3)}, persistent=("ema",))
    w["counts"].update(torch.tensor([[1]]))
    w["ema"].hits += 1
    snapshot = Window({"counts": CodeCounts(1, 3), "ema": UsageEMA(1, 3)}, persistent=("ema",))
    snapshot.share_persistent(w)
    assert snapshot["ema"] is w["ema"]
    w.reset()
    assert int(w["counts"].counts.sum()) == 0 and float(w["ema"].hits.sum()) == 3
    w.reset(persistent=True)
    assert float(w["ema"].hits.sum()) == 0


def test_a_scoped_window_keeps_one_part_per_module():
    parts = {s: Window({"n": Counter(("calls",))}) for s in ("blocks.0", "blocks.1")}
    w = Window.scoped(parts)
    WindowView(w, "blocks.1")["n"].add("calls", 4)
    assert [k for k, _ in WindowView(w, "blocks.1").items()] == ["n"]
    assert int(WindowView(w, "blocks.0")["n"]["calls"]) == 0
    assert int(WindowView(w, "blocks.1")["n"]["calls"]) == 4


def test_shift_moves_each_step_down_without_a_copy_and_empties_the_oldest():
    parts = {s: Window({k: Counter(("n",)) for k in ("step", "last", "before")}) for s in "ab"}
    w = Window.scoped(parts)
    view, other = WindowView(w, "b"), WindowView(w, "a")
    theirs = [other[k] for k in ("step", "last", "before")]
    step, last, before = view["step"], view["last"], view["before"]
    step.add("n", 3)
    last.add("n", 2)
    before.add("n", 1)
    view.shift("before", "last", "step")
    assert (view["before"], view["last"], view["step"]) == (last, step, before)
    assert [int(view[k]["n"]) for k in ("before", "last", "step")] == [2, 3, 0]
    assert [other[k] for k in ("step", "last", "before")] == theirs  # another module's part


def test_a_checkpoint_may_lack_per_step_entries_but_not_others():
    w = Window({"a": Counter(("n",)), "last": Counter(("n",))}, transient=("last",))
    state = w.state_dict()
    del state["entries"]["last"]
    w.load_state_dict(state)  # saved before the entry existed: it starts empty
    del state["entries"]["a"]
    with pytest.raises(KeyError, match=r"no state for \['a'\]"):
        w.load_state_dict(state)


def test_a_window_of_one_process_is_its_own_reduction():
    w = Window({"a": Counter(("n",))})
    reduced = w.reduced()
    assert reduced is w and reduced.group is None
