"""Pipeline parallelism (``torch.distributed.pipelining``, GPipe over 2 gloo processes, 2
micro-batches per step): each rank holds one stage, built as torchtitan does (a copy of the
model without the other stage's layers), and one monitor of its stage whose probes name modules
of either stage. Every rank logs every probe's metrics, equal to one process on the whole
batches, class-conditional probes with the whole batch's labels included (also with 2
data-parallel replicas of each stage, on 4 processes); the stage's
shape-inference forward on placeholder tensors is not recorded; a resumed
run (a gathered state) continues the window exactly; a probe on no stage, or a glob matching
different modules on different stages, is refused on both ranks alike."""

import copy
import os
import re

import pytest
import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

from collapse_monitor import CollapseMonitor, Sink, mitigations, probes
from collapse_monitor._modules import resolve_modules
from tests.dist import process_group, run_two


class Argmax(nn.Module):
    """The predicted classes, as codes (a probe with a histogram on the last stage)."""

    def forward(self, logits):
        return logits.argmax(-1)


class VQ(nn.Module):
    """A learned codebook (nn.Embedding + argmin) beside the head: its indices are probed and
    its dead codes reset, and nothing downstream reads it."""

    def __init__(self):
        super().__init__()
        self.codebook = nn.Embedding(8, 16)

    def forward(self, z):
        return torch.cdist(z, self.codebook.weight).argmin(-1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleDict(
            {str(i): nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for i in range(4)}
        )
        with torch.no_grad():  # 4 units of the last layer never fire: ReDo's to recycle
            self.layers["3"][0].bias[:4] = -50.0
        self.head = nn.Linear(16, 10)
        self.pick = Argmax()
        self.vq = VQ()

    def forward(self, x):
        for layer in self.layers.values():
            x = layer(x)
        if self.head is None:
            return x
        out = self.head(x)
        self.pick(out.detach())
        self.vq(x.detach())
        return out


def stage(net, s):
    part = copy.deepcopy(net)
    for i in list(part.layers):
        if (int(i) < 2) != (s == 0):
            del part.layers[i]
    if s == 0:
        part.head = part.pick = part.vq = None
    return part


def watched(**kw):
    return [
        probes.RepresentationRank("layers.0", name="first"),  # stage 0
        probes.DormantUnits("layers.3.1", name="dormant"),  # stage 1
        probes.LogitHealth("head", name="logits", nlm=False),  # stage 1
        probes.CodebookUsage("pick", 10, name="codes"),  # stage 1, with a histogram
        # stage 1, class-conditional: the whole batch's labels beside each micro-batch
        probes.NeuralCollapse("head", 10, name="nc", min_class_count=1),
        probes.CodebookUsage("vq", 8, name="vq"),  # stage 1
    ]


def monitor(part, **kw):
    """The probes of both stages, and mitigations of stage 1: ReDo of the dormant units (no
    collective) and ResetDeadCodes at each log (its draws broadcast over its stage's ranks)."""
    redo = mitigations.ReDo("dormant", layers={"layers.3.1": ("layers.3.0", "head")})
    fixes = [redo, mitigations.ResetDeadCodes("vq", every_n_steps=2)]
    return CollapseMonitor(part, watched(), 2, observe_every_n_steps=1, mitigations=fixes, **kw)


class Histograms(Sink):
    """The histogram and image tags every rank's sinks receive."""

    main_process_only = False

    def __init__(self):
        self.tags = set()

    def log_metrics(self, metrics, step):
        pass

    def log_histogram(self, tag, values, step):
        self.tags.add(tag)

    def log_image(self, tag, image, step):
        self.tags.add(tag)


def data(step, replica=0):
    g = torch.Generator().manual_seed(step + 100 * replica)
    return torch.randn(8, 16, generator=g), torch.randint(0, 10, (8,), generator=g)


def train(mon, schedule, rank, steps, replica=0):
    logs = []
    for s in steps:
        x, y = data(s, replica)
        with mon.observe(targets=y):
            if rank == 0:
                schedule.step(x)
            else:
                schedule.step(target=y, losses=[])
        out = mon.step()
        if out is not None:
            logs.append(out)
    return logs


def worker(rank, init, out_dir):
    with process_group(rank, init):
        torch.set_num_threads(1)
        part = stage(Net(), rank)
        refused = []
        for bad in ("layers.9", "layers.*"):  # on no stage; different modules per stage
            try:
                CollapseMonitor(part, [probes.RepresentationRank(bad, name="bad")], 2).close()
            except (KeyError, ValueError) as exc:
                refused.append(str(exc))
        # a mitigation's glob over both stages (on a copy: σReparam applies at attach)
        sigma = mitigations.SigmaReparam("layers.*", all_linear=True)
        try:
            CollapseMonitor(copy.deepcopy(part), [], 2, mitigations=[sigma]).close()
        except ValueError as exc:
            refused.append(str(exc))
        sink = Histograms()
        mon = monitor(part, sinks=[sink], pictures=["codes"])
        loss = lambda out, y: nn.functional.cross_entropy(out, y)  # noqa: E731
        schedule = ScheduleGPipe(PipelineStage(part, rank, 2, torch.device("cpu")), 2, loss)
        logs = train(mon, schedule, rank, range(3))  # the first step infers shapes
        state = mon.state_dict(gather=True)  # mid-window
        weights = copy.deepcopy(part.state_dict())  # (the mitigations change them at step 4)
        logs += train(mon, schedule, rank, range(3, 4))
        mon.close()
        out = {"logs": logs, "refused": refused, "histograms": sink.tags}
        out["weights"] = copy.deepcopy(part.state_dict())
        part.load_state_dict(weights)
        resumed = monitor(part)
        resumed.load_state_dict(state)
        out["resumed"] = train(resumed, schedule, rank, range(3, 4))
        resumed.close()
        # strict: a stage's mitigation that raises at a log raises on every rank (no hang)
        strict = CollapseMonitor(part, [], 2, strict=True, mitigations=[Failing()])
        try:
            train(strict, schedule, rank, range(2))
        except RuntimeError as exc:
            out["strict"] = str(exc)
        strict.close()
        torch.save(out, os.path.join(out_dir, f"pp{rank}.pt"))


class Failing(mitigations.Mitigation):
    """A mitigation of the last stage (its head) that raises at every log."""

    def attach(self, setup):
        super().attach(setup)
        resolve_modules(setup.model, "head")  # (NotFound on the first stage)

    def after_log(self, view):
        raise RuntimeError("boom")


def worker_pp_dp(rank, init, out_dir):
    """2 stages x 2 data-parallel replicas: replica ``rank // 2`` runs stage ``rank % 2``; each
    probe reduces over the 2 ranks of its stage."""
    with process_group(rank, init, world=4):
        torch.set_num_threads(1)
        replica, s = divmod(rank, 2)
        pipes = [torch.distributed.new_group([2 * d, 2 * d + 1]) for d in range(2)]
        part = stage(Net(), s)
        mon = monitor(part)
        loss = lambda out, y: nn.functional.cross_entropy(out, y)  # noqa: E731
        pipe = PipelineStage(part, s, 2, torch.device("cpu"), group=pipes[replica])
        logs = train(mon, ScheduleGPipe(pipe, 2, loss), s, range(4), replica)
        mon.close()
        weights = {k: v.clone() for k, v in part.state_dict().items()}
        torch.save({"logs": logs, "weights": weights}, os.path.join(out_dir, f"ppdp{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_two(worker, tmp_path_factory.mktemp("pp"), "pp")


def one_process(replicas=1):
    """The same model, whole batches of every replica (no optimizer step: the weights stay as
    they are)."""
    net = Net()
    mon = monitor(net)
    logs = []
    for s in range(4):
        x, y = (torch.cat(t) for t in zip(*[data(s, r) for r in range(replicas)]))
        with mon.observe(targets=y):
            nn.functional.cross_entropy(net(x), y).backward()
        out = mon.step()
        if out is not None:
            logs.append(out)
    mon.close()
    return logs, net


def compared(expected):
    """The keys a pipeline equals one process on: all but the forward calls, and the usage and
    resets of the codebook after its first reset (the codes are drawn from the rows of the last
    micro-batch there, of the whole batch here)."""
    return [k for k in expected if not k.endswith("/calls") and not re.search("vq|dead_codes", k)]


def test_every_rank_logs_every_stage_probe_as_one_process(ranks):
    want, _ = one_process()
    for r in ranks:
        assert len(r["logs"]) == 2
        for got, expected in zip(r["logs"], want):
            keys = compared(expected)
            assert {k.split("/")[1] for k in keys} >= {"first", "dormant", "logits", "codes", "nc"}
            assert set(keys) <= set(got)
            for k in keys:
                assert got[k] == pytest.approx(expected[k], rel=1e-6, abs=1e-9), k
            # two micro-batches: two forward calls a step, each counted
            assert got["collapse/first/calls"] == 2 * expected["collapse/first/calls"]
    assert ranks[0]["logs"] == ranks[1]["logs"]
    for r in ranks:  # a stage's histograms and pictures reach the other stage's sinks too
        assert {"collapse/codes/usage_hist", "collapse/codes/usage_sorted"} <= r["histograms"]


def test_stages_times_data_parallel_replicas_equal_one_process(tmp_path):
    want, _ = one_process(replicas=2)
    outs = run_two(worker_pp_dp, tmp_path, "ppdp", world=4)
    for r in outs:
        for got, expected in zip(r["logs"], want):
            keys = compared(expected)
            assert set(keys) <= set(got)
            for k in keys:
                assert got[k] == pytest.approx(expected[k], rel=1e-6, abs=1e-9), k
    assert all(r["logs"] == outs[0]["logs"] for r in outs)
    # stage 1's replicas (ranks 1 and 3) reset the same codes to the same rows: drawn by the
    # stage's first rank and broadcast over the stage's group (global rank 1 is its rank 0)
    before = Net().vq.codebook.weight
    (key,) = [k for k in outs[1]["weights"] if k.startswith("vq.")]
    after = [outs[r]["weights"][key] for r in (1, 3)]
    assert torch.equal(after[0], after[1])
    reset = int((after[0] != before).any(1).sum())  # (a code may be reset at both logs)
    totals = [log["collapse/mitigations/reset_dead_codes"] for log in outs[0]["logs"]]
    assert 0 < totals[0] <= reset <= totals[1]


def test_a_stages_mitigations_act_there_as_in_one_process_and_every_rank_counts_them(ranks):
    (first, _), (want, net) = ranks[0]["logs"], one_process()
    # the 4 units that never fire, and those whose score is below ReDo's threshold
    assert first["collapse/mitigations/redo"] == want[0]["collapse/mitigations/redo"] >= 4
    # the first log's dead codes: as in one process (the windows before any reset agree)
    resets = first["collapse/mitigations/reset_dead_codes"]
    assert resets == want[0]["collapse/mitigations/reset_dead_codes"] > 0
    assert ranks[1]["logs"] == ranks[0]["logs"]  # the counts on both ranks
    whole = net.state_dict()
    for key in ("layers.3.0.weight", "layers.3.0.bias", "head.weight"):  # ReDo's read back
        assert torch.equal(ranks[1]["weights"][key], whole[key]), key
    assert not torch.equal(whole["layers.3.0.weight"], Net().state_dict()["layers.3.0.weight"])


def test_a_stages_mitigation_failing_under_strict_raises_on_every_rank(ranks):
    assert ranks[1]["strict"] == "boom"
    assert ranks[0]["strict"] == "a mitigation failed on another rank: RuntimeError: boom"


def test_a_gathered_state_resumes_each_stage_exactly(ranks):
    for r in ranks:
        assert r["resumed"] == [r["logs"][1]]


def test_a_probe_on_no_stage_or_on_different_modules_per_stage_is_refused_alike(ranks):
    for r in ranks:
        missing, different, mitigation = r["refused"]
        assert "acts on different modules on different ranks" in mitigation
        assert "0: ('layers.0'," in mitigation and "1: ('layers.2'," in mitigation
        assert "no module named or matching 'layers.9'" in missing
        assert "matches different modules on different ranks" in different
        assert "0: ('layers.0', 'layers.1')" in different  # (the outermost matches)
    assert ranks[0]["refused"][1] == ranks[1]["refused"][1]
