"""Class-sharded neural-collapse statistics (issue 16) on real torch.distributed (gloo, 2
processes): each rank keeps half of the classes, rows travel to their class's owner at the end
of every recorded step, and the metrics equal one process's over the union of the rows."""

import importlib
import os

import pytest
import torch
from torch import nn

from collapse_monitor import CollapseMonitor, probes
from collapse_monitor import functional as F
from collapse_monitor.stats import ClassMoments
from tests.dist import process_group, run_two
from tests.functional.test_neural_collapse import clustered
from tests.reference import assert_metrics_close

# the module (``functional.neural_collapse`` is also the name of a function there)
nc_functional = importlib.import_module("collapse_monitor.functional.neural_collapse")

C, D = 40, 6  # more used classes than dimensions: the sharded readout (D x D Gram, pair hops)
KEYS = [
    "nc1",
    "nc1_rank",
    "nc1_quotient",
    "equinorm_features",
    "equiangular",
    "cos_std",
    "cdnv",
    "cdnv_pairs_skipped",
    "classes_used",
    "samples",
    "self_duality",
    "equinorm_weights",
]
FEW = 30  # min_class_count of a second probe: 2 and 4 classes used (<= D): gathered
STEPS = 8  # two windows of 4 steps


def rows_of(step: int, rank: int):
    """The rows rank ``rank`` records at ``step``: uneven sizes, classes 0 and 3 never, class 5
    only on rank 1, an ignored row and a NaN row; rank 1 has no batch at step 2 and two at 5."""
    x, y = clustered(C, D, 3000, offset=20.0, noise=0.3, seed=7)
    y = torch.where((y == 0) | (y == 3), 1, y)
    x, y = x.float(), y.clone()
    start = (step * 2 + rank) * 180
    sizes = {(2, 1): [], (5, 1): [70, 110]}.get((step, rank), [90 + 40 * rank])
    out = []
    for n in sizes:
        xs, ys = x[start : start + n].clone(), y[start : start + n].clone()
        if rank == 0:
            ys[ys == 5] = 6
        ys[0] = -100  # ignore_index
        xs[1, 2] = float("nan")  # excluded and counted
        out.append((xs, ys))
        start += n
    return out


def union(steps):
    xs, ys = zip(*[b for s in steps for r in (0, 1) for b in rows_of(s, r)])
    x, y = torch.cat(xs), torch.cat(ys)
    keep = (y != -100) & torch.isfinite(x).all(1)
    return x[keep], y[keep]


def make_probes(shard=True):
    return [
        probes.NeuralCollapse("0", C, name="nc", shard_classes=shard, tile_size=7),
        probes.NeuralCollapse("0", C, name="few", shard_classes=shard, min_class_count=FEW),
    ]


def monitor(head):
    return CollapseMonitor(nn.Sequential(head), make_probes(), 4, observe_every_n_steps=1)


def run(mon, steps, rank):
    logs = []
    for s in steps:
        for xs, ys in rows_of(s, rank):
            with mon.observe(targets=ys):
                mon.model(xs)
        out = mon.step()
        if out is not None:
            logs.append(out)
    return logs


def worker(rank, init, out_dir):
    with process_group(rank, init):
        torch.manual_seed(0)
        head = nn.Linear(D, C)
        mon = monitor(head)
        moments = mon.driver(mon.probes[0]).window["moments"]
        sharded_bytes, full_bytes = moments.nbytes(), None
        logs = run(mon, range(6), rank)
        state = mon.state_dict()  # mid-window: each rank saves its own class shard
        logs += run(mon, range(6, STEPS), rank)
        one = ClassMoments(C)
        one.update(torch.randn(3, D), torch.tensor([0, 1, 2]))
        full_bytes = one.nbytes()
        mon.close()

        resumed = monitor(head)
        resumed.load_state_dict(state)
        after = run(resumed, range(6, STEPS), rank)
        resumed.close()

        # a trainer that saves rank 0's state only: rank 1 cannot use it, so the resumed
        # window is skipped on both ranks, and the next one is whole again
        if rank == 0:
            torch.save(state, os.path.join(out_dir, "state0.pt"))
        torch.distributed.barrier()
        rank0 = monitor(head)
        rank0.load_state_dict(torch.load(os.path.join(out_dir, "state0.pt"), weights_only=False))
        skipped = run(rank0, range(6, STEPS), rank) + run(rank0, range(4), rank)
        rank0.close()

        # ranks with different feature sizes: both ranks' probes stop, with the reason
        bad = CollapseMonitor(nn.Sequential(nn.Identity()), make_probes()[:1], 4, strict=True)
        with bad.observe(targets=torch.arange(8)):
            bad.model(torch.randn(8, D + rank))
        try:
            bad.step()
        except ValueError as exc:
            disagree = str(exc)
        bad.close()
        # the same without strict, at the default cadence: the probe stops on both ranks and
        # the ranks keep stepping together (no rank waits in a collective the other skipped)
        lenient = CollapseMonitor(nn.Sequential(nn.Identity()), make_probes()[:1], 4)
        for step in range(12):
            with lenient.observe(targets=torch.arange(8)):
                lenient.model(torch.randn(8, D + rank * (step >= 1)))
            lenient.step()
        stopped = (lenient.probes[0].disabled, lenient.error_count)
        lenient.close()

        # the default cadence (rows per step agreed by the routing, so that both ranks record
        # the same steps): uneven batches, rank 1 without a batch on some steps
        default = CollapseMonitor(nn.Sequential(head), make_probes()[:1], 8)
        cadence = []
        for step in range(24):
            for xs, ys in rows_of(step % 8, rank)[: 0 if rank and step % 5 == 2 else None]:
                with default.observe(targets=ys):
                    default.model(xs)
            out = default.step()
            if out is not None:
                cadence.append(out)
        recorded = default.driver(default.probes[0]).observed_steps
        default.close()
        torch.save(
            {
                "logs": logs,
                "resumed": after,
                "bytes": (sharded_bytes, moments.nbytes(), full_bytes),
                "rank0_only": skipped,
                "disagree": disagree,
                "stopped": stopped,
                "cadence": (cadence, recorded),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_two(worker, tmp_path_factory.mktemp("shards"), "rank")


def reference(steps, min_class_count=2):
    x, y = union(steps)
    torch.manual_seed(0)
    head = nn.Linear(D, C)
    return F.neural_collapse(x, y, C, head.weight, head.bias, min_class_count=min_class_count)


@pytest.mark.parametrize("window", [0, 1])
def test_sharded_metrics_equal_one_process_on_the_union(results, window):
    a, b = (r["logs"][window] for r in results)
    assert a == b
    steps = range(4 * window, 4 * window + 4)
    for name, m in (("nc", 2), ("few", FEW)):
        got = {k.split("/")[-1]: v for k, v in a.items() if k.startswith(f"collapse/{name}/")}
        want = reference(steps, m)
        want["samples"] = float(len(union(steps)[1]))
        want.pop("ncc_mismatch", None)
        assert got.keys() >= want.keys()
        assert_metrics_close(got, want, keys=[k for k in KEYS if k in want])
        assert "ncc_mismatch_lagged" not in got  # not available with class shards
    assert a["collapse/nc/classes_used"] > D >= a["collapse/few/classes_used"] >= 2
    batches = sum(len(rows_of(s, r)) for s in steps for r in (0, 1))
    assert a["collapse/nc/skipped_nonfinite"] == batches  # one NaN row per batch


def test_each_rank_holds_half_of_the_classes(results):
    for r in results:
        before, after, full = r["bytes"]
        assert before <= 64 * C  # only O(C) before the first rows fix D
        per_class = 16 * C * D  # shifts and sums
        assert after - 8 * D * D <= per_class / 2 + 64 * C  # plus O(C) counts and flags
        assert full - 8 * D * D >= per_class  # one process's ClassMoments, for scale


def test_resume_from_each_ranks_shard_is_exact(results):
    for r in results:
        assert r["resumed"] == [r["logs"][1]]


def test_a_checkpoint_of_rank_0_only_skips_the_resumed_window_on_every_rank(results):
    for r in results:
        lost, whole = r["rank0_only"]
        assert not [
            k
            for k in lost
            if k.startswith("collapse/nc/") and "calls" not in k and "skipped" not in k
        ]
        assert_metrics_close(whole, r["logs"][0], rtol=1e-9)


def test_ranks_with_different_feature_sizes_stop_together(results):
    for r in results:
        assert "ranks disagree on the feature dimension: [6, 7]" in r["disagree"]
    # rank 1 failed (its batches changed size), rank 0 stopped when the ranks agreed
    assert [r["stopped"] for r in results] == [(True, 0), (True, 1)]


def test_default_cadence_records_the_same_steps_on_every_rank(results):
    (a, steps_a), (b, steps_b) = (r["cadence"] for r in results)
    assert len(a) == 3 and a == b
    assert all(log["collapse/nc/classes_used"] > D for log in a)
    assert 0 < steps_b < steps_a < 24  # rank 1 missed steps; neither recorded every step


def test_pair_sample_is_refused_with_shards():
    with pytest.raises(ValueError, match="pair_sample"):
        probes.NeuralCollapse("0", C, shard_classes=True, pair_sample=10)


def worker3(rank, init, out_dir):
    """Three ranks (an odd world: the pairs meet at hop 1 only), every step recorded."""
    with process_group(rank, init, world=3):
        torch.manual_seed(0)
        head = nn.Linear(D, C)
        mon = monitor(head)
        logs = []
        for step in range(4):
            for xs, ys in rows_of(step, 0)[: 0 if rank == 2 and step == 1 else None]:
                rows = torch.arange(len(ys)) % 3 == rank
                with mon.observe(targets=ys[rows]):
                    mon.model(xs[rows])
            logs.append(mon.step())
        # one rank's pair work fails during a readout: every rank still finishes it
        for xs, ys in rows_of(0, 0):
            with mon.observe(targets=ys):
                mon.model(xs)
        mon.step()
        if rank == 2:
            nc_functional.cross_pairwise_sums = broken
        failed = mon.compute()
        disabled = mon.probes[0].disabled
        mon.close()
        torch.save((logs[-1], failed, disabled), os.path.join(out_dir, f"three{rank}.pt"))


def broken(*args):
    raise RuntimeError("out of memory (simulated)")


def test_three_ranks_equal_one_process(tmp_path):
    runs = run_two(worker3, tmp_path, "three", world=3)
    logs = [r[0] for r in runs]
    assert logs[0] == logs[1] == logs[2]
    # the rank whose pairs failed stopped its probe; the others got no pairwise metrics
    assert [r[2] for r in runs] == [False, False, True]
    assert all("collapse/nc/cdnv" not in r[1] for r in runs)
    assert all("collapse/nc/nc1" in r[1] for r in runs[:2])
    skip = torch.ones(sum(len(b[1]) for s in range(4) for b in rows_of(s, 0)), dtype=torch.bool)
    offset = sum(len(b[1]) for b in rows_of(0, 0))
    skip[offset : offset + len(rows_of(1, 0)[0][1])] &= (
        torch.arange(len(rows_of(1, 0)[0][1])) % 3 != 2
    )
    x = torch.cat([b[0] for s in range(4) for b in rows_of(s, 0)])[skip]
    y = torch.cat([b[1] for s in range(4) for b in rows_of(s, 0)])[skip]
    keep = (y != -100) & torch.isfinite(x).all(1)
    torch.manual_seed(0)
    head = nn.Linear(D, C)
    want = F.neural_collapse(x[keep], y[keep], C, head.weight, head.bias)
    want["samples"] = float(keep.sum())
    got = {k.split("/")[-1]: v for k, v in logs[0].items() if k.startswith("collapse/nc/")}
    assert_metrics_close(got, want, keys=KEYS)
