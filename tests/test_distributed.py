"""Real torch.distributed (gloo, 2 processes): all-reduced windows equal one process on the union."""

import os
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from collapse_monitor import CollapseMonitor, probes
from collapse_monitor import functional as F
from collapse_monitor.stats import ClassMoments
from tests.dist import process_group, run_two
from tests.functional.test_neural_collapse import clustered
from tests.reference import assert_metrics_close

C, D = 9, 6
KEYS = [
    "nc1",
    "nc1_quotient",
    "equinorm_features",
    "equiangular",
    "cos_std",
    "cdnv",
    "classes_used",
]


def data():
    x, y = clustered(C, D, 700, offset=50.0, noise=0.1, seed=5)
    return x.float(), y


def shard(rank, x, y):
    # uneven shards; rank 1 never sees class 0 and class 3; one rank-0 batch is empty
    on_one = (y != 0) & (y != 3) & (torch.arange(len(y)) % 3 != 0)
    idx = torch.nonzero(on_one if rank == 1 else ~on_one).flatten()
    return x[idx], y[idx]


def make_probes():
    # tiles of 4 classes: the two ranks split the 6 tiles of class pairs between them
    return [
        probes.NeuralCollapse("0", C, name="h", tile_size=4),
        probes.NeuralCollapse("0", C, name="s", pair_sample=PAIRS, ncc_max_rows=0),
    ]


PAIRS = 25  # of the 36 class pairs


def worker(rank, init, out_dir):
    with process_group(rank, init):
        x, y = data()
        xs, ys = shard(rank, x, y)
        torch.manual_seed(0)
        head = nn.Linear(D, C)  # same weights on both ranks
        mon = CollapseMonitor(nn.Sequential(head), make_probes(), 2, observe_every_n_steps=1)
        sizes = [0, 17, len(ys) - 17] if rank == 0 else [len(ys) // 3, len(ys) - len(ys) // 3]
        for idx in torch.split(torch.arange(len(ys)), sizes):
            with mon.observe(targets=ys[idx]):
                mon.model(xs[idx])
        logged = mon.compute()
        state = mon.state_dict()  # collective: the reduced window
        mon.close()
        resumed = CollapseMonitor(nn.Sequential(head), make_probes(), 2, observe_every_n_steps=1)
        resumed.load_state_dict(state)  # every rank loads it; only rank 0 keeps the window
        after_resume = resumed.compute()
        st = ClassMoments(C)
        st.update(xs, ys)
        st.all_reduce()
        # a rank that saw nothing (its feature dimension still unknown) joins a clone's reduce
        lonely = ClassMoments(C)
        if rank == 0:
            lonely.update(xs, ys)
        lonely_reduced = lonely.clone().all_reduce()
        torch.save(
            {
                "lonely": (lonely_reduced.count, lonely_reduced.within_class_scatter()),
                "metrics": logged,
                "state": state,
                "resumed": after_resume,
                "count": st.count,
                "means": st.means(),
                "scatter": st.within_class_scatter(),
                "var": st.class_variances(),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_two(worker, tmp_path_factory.mktemp("dist"), "rank")


def test_all_reduced_statistics_equal_single_process_union(results):
    x, y = data()
    counts = torch.bincount(y, minlength=C)
    means = torch.stack([x[y == c].double().mean(0) for c in range(C)])
    for r in results:
        assert torch.equal(r["count"], counts)
        assert torch.allclose(r["means"], means, rtol=1e-12, atol=1e-12)
        got = F.metrics_from_class_statistics(r["count"], r["means"], r["scatter"], r["var"])
        assert_metrics_close(got, F.neural_collapse(x, y, C), keys=KEYS)


def test_a_rank_without_samples_joins_the_reduction(results):
    x, y = data()
    xs, ys = shard(0, x, y)
    ref = ClassMoments(C)
    ref.update(xs, ys)
    for r in results:
        count, scatter = r["lonely"]
        assert torch.equal(count, ref.count)
        assert torch.allclose(scatter, ref.within_class_scatter(), rtol=1e-10, atol=1e-10)


def test_monitor_metrics_identical_on_both_ranks_and_equal_union(results):
    x, y = data()
    torch.manual_seed(0)
    head = nn.Linear(D, C)
    ref = F.neural_collapse(x, y, C, head.weight)
    a, b = results[0]["metrics"], results[1]["metrics"]
    assert a == b
    got = {k.split("/")[-1]: v for k, v in a.items() if k.startswith("collapse/h/")}
    assert_metrics_close(got, ref, keys=KEYS + ["self_duality", "equinorm_weights"])
    assert got["samples"] == len(y)


def test_sampled_pairs_are_drawn_alike_on_both_ranks_and_match_the_union(results):
    x, y = data()
    counts = torch.bincount(y, minlength=C)
    means = torch.stack([x[y == c].double().mean(0) for c in range(C)])
    var = torch.stack([(x[y == c].double() - means[c]).pow(2).sum(1).mean() for c in range(C)])
    # the probe seeds its draw with the window's sample count (the same on every rank)
    ref = F.sampled_pairwise_metrics(
        means - means.mean(0), var, PAIRS, torch.Generator().manual_seed(int(counts.sum()))
    )
    got = {k.split("/")[-1]: v for k, v in results[0]["metrics"].items() if "/s/" in k}
    assert results[0]["metrics"] == results[1]["metrics"]
    assert "cdnv" not in got and got["pairs_sampled"] == PAIRS
    assert_metrics_close(got, ref, keys=[k for k in ref if k.endswith("_sampled")], rtol=1e-9)


def test_state_dict_under_ddp_is_the_reduced_window_and_resumes_without_double_counting(results):
    x, y = data()
    state = results[0]["state"]["probes"]["h"]["window"]["entries"]["moments"]["states"]
    assert torch.equal(state["count"], torch.bincount(y, minlength=C))
    for r in results:
        assert r["resumed"]["collapse/h/samples"] == len(y)
        for k, v in r["metrics"].items():
            assert r["resumed"][k] == pytest.approx(v, rel=1e-9, abs=1e-12), k


def two_windows_worker(rank, init, out_dir, lonely=False):
    with process_group(rank, init):
        x, y = data()
        torch.manual_seed(0)
        mon = CollapseMonitor(nn.Sequential(nn.Linear(D, C)), make_probes()[:1], 1)
        logged = []
        for window, keep in enumerate((y < C - 2, torch.ones_like(y, dtype=torch.bool))):
            # window 2 holds two classes first seen there, on both ranks (each rank takes its
            # own shift for them): only those are re-centred before the reduce
            xs, ys = shard(rank, x[keep] + window, y[keep])
            if not (lonely and rank == 1 and window == 0):  # lonely: rank 1 sees no batch
                with mon.observe(targets=ys):
                    mon.model(xs)
            logged.append(mon.step())
        mon.close()
        torch.save(logged, os.path.join(out_dir, f"windows{rank}.pt"))


def lonely_two_windows_worker(rank, init, out_dir):
    two_windows_worker(rank, init, out_dir, lonely=True)


@pytest.mark.parametrize("lonely", [False, True])
def test_a_later_window_adds_sums_around_agreed_shifts_and_equals_the_union(tmp_path, lonely):
    worker = lonely_two_windows_worker if lonely else two_windows_worker
    r0, r1 = run_two(worker, tmp_path, "windows")
    assert r0 == r1
    x, y = data()
    for window, keep in enumerate((y < C - 2, torch.ones_like(y, dtype=torch.bool))):
        xs, ys = x[keep] + window, y[keep]
        if lonely and window == 0:  # only rank 0's rows
            xs, ys = shard(0, xs, ys)
        ref = F.neural_collapse(xs, ys, C)
        got = {k.split("/")[-1]: v for k, v in r0[window].items() if k.startswith("collapse/h/")}
        assert_metrics_close(got, ref, keys=KEYS)


def reset_worker(rank, init, out_dir, every_step=False):
    from collapse_monitor import mitigations
    from tests.mitigations.test_reset_dead_codes import VQ, Model, concentrated

    with process_group(rank, init):
        torch.manual_seed(0)  # same initial codebook on both ranks
        model = Model(VQ(16, 4))
        probe = probes.CodebookUsage("vq", 16, ema_decay=0.5, warmup_steps=1)
        mon = CollapseMonitor(
            model,
            [probe],
            2,
            mitigations=[mitigations.ResetDeadCodes("vq", every_step=every_step)],
            observe_every_n_steps=1,
        )
        for step in range(2):  # each rank sees different, concentrated data
            with mon.observe():
                model(concentrated(32 + 16 * rank, 4, seed=10 * rank + step))
            metrics = mon.step()
        torch.save(
            {
                "codebook": model.vq.codebook.weight.detach(),
                "metrics": metrics,
                "dead": mon.driver(probe).last.masks[probe.key("dead")],
            },
            os.path.join(out_dir, f"reset{rank}.pt"),
        )


def every_step_reset_worker(rank, init, out_dir):
    reset_worker(rank, init, out_dir, every_step=True)


def test_every_step_dead_code_reset_leaves_identical_replicas(tmp_path):
    r0, r1 = run_two(every_step_reset_worker, tmp_path, "reset")
    count = r0["metrics"]["collapse/mitigations/reset_dead_codes"]
    assert count > 0 and r0["metrics"] == r1["metrics"]
    assert torch.equal(r0["codebook"], r1["codebook"])


def failing_reset_worker(rank, init, out_dir):
    from collapse_monitor import mitigations
    from tests.mitigations.test_reset_dead_codes import VQ, Model, concentrated

    with process_group(rank, init):
        torch.manual_seed(0)
        model = Model(VQ(16, 4))
        reset = mitigations.ResetDeadCodes("vq", every_step=True)
        mon = CollapseMonitor(model, [probes.CodebookUsage("vq", 16)], 3, mitigations=[reset])
        keep = reset._keep_input

        def fails_on_rank_1(*args):
            if rank == 1 and mon.global_step == 1:
                raise ValueError("rank 1's capture fails")
            keep(*args)

        reset._keep_input = fails_on_rank_1
        for step in range(6):  # a failure inside the first window: no rank may hang
            with mon.observe():
                model(concentrated(32, 4, seed=10 * rank + step))
            mon.step()
        torch.save({"disabled": reset.disabled}, os.path.join(out_dir, f"fail{rank}.pt"))


def test_an_every_step_reset_failing_on_one_rank_stops_on_both_without_a_hang(tmp_path):
    r0, r1 = run_two(failing_reset_worker, tmp_path, "fail")
    assert r0["disabled"] and r1["disabled"]


def test_dead_code_reset_leaves_identical_replicas(tmp_path):
    r0, r1 = run_two(reset_worker, tmp_path, "reset")
    assert r0["metrics"]["collapse/mitigations/reset_dead_codes"] > 0
    assert r0["metrics"] == r1["metrics"]
    assert torch.equal(r0["codebook"], r1["codebook"])
    from tests.mitigations.test_reset_dead_codes import VQ

    torch.manual_seed(0)
    initial = VQ(16, 4).codebook.weight.detach()
    replaced = (r0["codebook"] != initial).any(1).sum()
    assert replaced == r0["metrics"]["collapse/mitigations/reset_dead_codes"]


def index_stream(rank):
    g = torch.Generator().manual_seed(100 + rank)
    hi = 12 if rank == 0 else 20  # codes 12..19 are used only on rank 1
    return [torch.randint(0, hi, (10 + 7 * rank + s,), generator=g) for s in range(6)]


def usage_worker(rank, init, out_dir):
    from tests.probes.test_codebook_usage import Quantizer

    with process_group(rank, init):
        q = nn.Sequential()
        q.add_module("vq", Quantizer())
        probe = probes.CodebookUsage("vq", 24, ema_decay=0.7, warmup_steps=2)
        mon = CollapseMonitor(q, [probe], 6, observe_every_n_steps=1)
        for idx in index_stream(rank):
            with mon.observe():
                q.vq(torch.zeros(len(idx), 1), idx)
            metrics = mon.step()
        torch.save(metrics, os.path.join(out_dir, f"usage{rank}.pt"))


def test_codebook_usage_under_ddp_equals_the_pooled_reference(tmp_path):
    import numpy as np

    m0, m1 = run_two(usage_worker, tmp_path, "usage")
    assert m0 == m1
    streams = [index_stream(r) for r in range(2)]
    union = torch.cat([torch.cat(s) for s in streams])
    ref = F.codebook_usage(union, 24)
    assert m0["collapse/vq/perplexity"] == pytest.approx(ref["perplexity"].item(), rel=1e-12)
    assert m0["collapse/vq/usage"] == ref["usage"].item() == 20 / 24
    ema, rows = np.zeros(24), 0.0
    for a, b in zip(*streams):  # the global EMA: per step, both ranks' counts together
        step = torch.cat([a, b])
        ema = 0.7 * ema + 0.3 * np.bincount(step.numpy(), minlength=24)
        rows = 0.7 * rows + 0.3 * len(step)
    assert m0["collapse/vq/dead_codes"] == (ema / rows < 0.01 / 24).sum() == 4


def representation_data():
    from tests.functional.test_representation import anisotropic

    z = anisotropic(600, 8, offset=20.0)
    mu, logvar = torch.randn(600, 4).double(), (torch.randn(600, 4) - 1).double()
    groups = torch.arange(600) % 3
    return z, mu, logvar, groups


def representation_worker(rank, init, out_dir):
    from tests.probes.test_representation_probes import Returns

    with process_group(rank, init):
        torch.manual_seed(0)
        z, mu, logvar, groups = representation_data()
        mine = torch.arange(600)[:250] if rank == 0 else torch.arange(600)[250:]  # uneven
        model = nn.Module()
        model.emb = nn.Identity()
        model.post = Returns(lambda x: (x[:, :4], x[:, 4:]))
        mon = CollapseMonitor(
            model,
            [
                probes.RepresentationRank("emb", name="rank"),
                probes.PosteriorCollapse("post", name="vae"),
                probes.GroupCollapse("emb", 3, name="site"),
            ],
            10**9,
            observe_every_n_steps=1,
        )
        for idx in torch.split(mine, 64):
            with mon.observe(groups=groups[idx]):
                model.emb(z[idx])
                model.post(torch.cat([mu[idx], logvar[idx]], 1))
        torch.save(mon.compute(), os.path.join(out_dir, f"repr{rank}.pt"))


def test_representation_probes_under_ddp_equal_the_union(tmp_path):
    m0, m1 = run_two(representation_worker, tmp_path, "repr")
    assert m0 == m1
    torch.manual_seed(0)
    z, mu, logvar, groups = representation_data()
    rank = F.representation_rank(z)
    post = F.posterior_collapse(mu, logvar)
    for key in ("erank", "rankme", "norm_std"):
        assert m0[f"collapse/rank/{key}"] == pytest.approx(rank[key], rel=1e-6)
    for key in ("kl_total", "active_units", "units_mixed"):
        assert m0[f"collapse/vae/{key}"] == pytest.approx(post[key], rel=1e-9)
    assert m0["collapse/site/nc1"] == pytest.approx(
        F.neural_collapse(z, groups, 3)["nc1"], rel=1e-6
    )


def attention_worker(rank, init, out_dir):
    from tests.probes.test_attention_entropy import SDPAAttention

    with process_group(rank, init):
        torch.manual_seed(0)
        m = nn.Sequential()
        m.add_module("attn", SDPAAttention())
        x = torch.randn(5, 11, 32)
        mon = CollapseMonitor(
            m, [probes.AttentionEntropy("attn", queries=None)], 1, observe_every_n_steps=1
        )
        with mon.observe():
            m.attn(x[:2] if rank == 0 else x[2:], causal=True)  # uneven shards
        torch.save(mon.step(), os.path.join(out_dir, f"attn{rank}.pt"))


def test_attention_entropy_under_ddp_equals_one_process(tmp_path):
    from tests.probes.test_attention_entropy import SDPAAttention

    m0, m1 = run_two(attention_worker, tmp_path, "attn")
    assert m0 == m1
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("attn", SDPAAttention())
    x = torch.randn(5, 11, 32)
    mon = CollapseMonitor(
        m, [probes.AttentionEntropy("attn", queries=None)], 1, observe_every_n_steps=1
    )
    with mon.observe():
        m.attn(x, causal=True)
    single = mon.step()
    for key, value in single.items():
        if key.endswith("/calls"):  # forward calls, summed over ranks: one per rank here
            assert m0[key] == 2 * value
        else:
            assert m0[key] == pytest.approx(value, rel=1e-6), key


def sigma_worker(rank, init, out_dir):
    from torch.nn.parallel import DistributedDataParallel

    from tests.mitigations.test_sigma_reparam import blocks, rule_monitor

    with process_group(rank, init):
        model = blocks()
        ddp = DistributedDataParallel(model)
        opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
        mon = rule_monitor(
            model
        )  # fires at the log of step 2: applied mid-training, after wrapping
        g = torch.Generator().manual_seed(rank)
        for _ in range(5):
            x = torch.randn(2 + rank, 6, 32, generator=g)  # different data per rank
            with mon.observe():
                loss = ddp(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            mon.step(optimizer=opt)
        torch.save(
            {k: v.clone() for k, v in model.state_dict().items()},
            os.path.join(out_dir, f"sigma{rank}.pt"),
        )
        del ddp  # see process_group: freed before the group is destroyed


def test_sigma_reparam_mid_training_keeps_ddp_replicas_identical(tmp_path):
    s0, s1 = run_two(sigma_worker, tmp_path, "sigma")
    assert "0.attn.q.parametrizations.weight.0.gamma" in s0
    assert s0.keys() == s1.keys()
    for key in s0:
        assert torch.equal(s0[key], s1[key]), key


def simvq_worker(rank, init, out_dir):
    from torch.nn.parallel import DistributedDataParallel

    from tests.mitigations.test_simvq import AutoEncoder, rule_monitor

    with process_group(rank, init):
        torch.manual_seed(0)
        model = AutoEncoder()
        ddp = DistributedDataParallel(model)
        opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
        mon = rule_monitor(model)  # applied at the log of step 2, after wrapping
        g = torch.Generator().manual_seed(rank)
        for _ in range(5):
            x = torch.randn(4 + rank, 8, generator=g)  # different data per rank
            with mon.observe():
                recon, commit = ddp(x)
            ((recon - x).pow(2).mean() + commit).backward()
            opt.step()
            opt.zero_grad()
            mon.step(optimizer=opt)
        torch.save(
            {k: v.clone() for k, v in model.state_dict().items()},
            os.path.join(out_dir, f"simvq{rank}.pt"),
        )
        del ddp


def test_simvq_mid_training_keeps_ddp_replicas_identical(tmp_path):
    s0, s1 = run_two(simvq_worker, tmp_path, "simvq")
    w = "vq.codebook.parametrizations.weight.0.weight"
    assert w in s0 and not torch.equal(s0[w], torch.eye(4))  # applied, then trained
    assert s0.keys() == s1.keys()
    for key in s0:
        assert torch.equal(s0[key], s1[key]), key


def health_worker(rank, init, out_dir):
    from collapse_monitor import mitigations
    from tests.probes.test_logit_probes import dead_mlp

    with process_group(rank, init):
        m = dead_mlp()
        m.add_module("out", nn.Identity())
        mon = CollapseMonitor(
            m,
            [probes.DormantUnits("1", name="dormant"), probes.LogitHealth("2", name="logits")],
            2,
            mitigations=[mitigations.ReDo()],
            observe_every_n_steps=1,
        )
        g = torch.Generator().manual_seed(rank)
        for _ in range(2):
            x = torch.randn(20 + 30 * rank, 10, generator=g)
            with mon.observe(targets=torch.zeros(len(x), dtype=torch.long)):
                m(x)
            metrics = mon.step()
        torch.save(
            {"metrics": metrics, "weights": {k: v.clone() for k, v in m.state_dict().items()}},
            os.path.join(out_dir, f"health{rank}.pt"),
        )


def test_dormant_units_logit_health_and_redo_under_ddp(tmp_path):
    from tests.probes.test_logit_probes import dead_mlp

    r0, r1 = run_two(health_worker, tmp_path, "health")
    assert r0["metrics"] == r1["metrics"]
    assert r0["metrics"]["collapse/mitigations/redo"] == 6
    for key in r0["weights"]:
        assert torch.equal(r0["weights"][key], r1["weights"][key]), key
    m = dead_mlp()
    gens = [torch.Generator().manual_seed(r) for r in range(2)]
    batches = [torch.randn(20 + 30 * r, 10, generator=gens[r]) for _ in range(2) for r in range(2)]
    logits = m(torch.cat(batches)).detach()
    ref = F.logit_health(logits, torch.zeros(len(logits), dtype=torch.long))
    assert r0["metrics"]["collapse/logits/log_z_mean"] == pytest.approx(ref["log_z_mean"], rel=1e-6)
    assert r0["metrics"]["collapse/dormant/1/dormant_fraction"] == 6 / 32
    # the last step holds 20 rows on rank 0, 50 on rank 1: reported from the reduced 70 (>= 64)
    assert r0["metrics"]["collapse/dormant/1/dormant_fraction_last_step"] == 6 / 32


def last_step_worker(rank, init, out_dir):
    from tests.probes.test_codebook_usage import Quantizer
    from tests.probes.test_representation_probes import _Posterior

    with process_group(rank, init):
        model = nn.ModuleDict({"act": nn.Identity(), "vq": Quantizer(), "enc": _Posterior()})
        mon = CollapseMonitor(
            model,
            [
                probes.DormantUnits("act", name="d"),
                probes.CodebookUsage("vq", 8),
                probes.PosteriorCollapse("enc", name="vae"),
            ],
            3,
        )
        g = torch.Generator().manual_seed(rank)
        for step in range(3):
            acts, codes = torch.rand(80, 16, generator=g), torch.arange(8).repeat(10)
            mu = torch.randn(80, 8, generator=g)
            if step == 2:  # rank 0's last step: units 0-9 silent, codes 0 and 1 only, 6 of 8
                acts[:, :10], codes = 0.0, torch.tensor([0, 1]).repeat(40)  # latents still
                mu[:, :6] *= 1e-3
            if not (rank == 1 and step == 2):  # rank 1 sees no batch in the last step
                with mon.observe():
                    model["act"](acts)
                    model["vq"](torch.zeros(80, 1), codes)
                    model["enc"](mu)
            metrics = mon.step()
        torch.save(metrics, os.path.join(out_dir, f"last{rank}.pt"))


def test_the_last_step_is_the_windows_last_step_on_every_rank(tmp_path):
    # rank 1's last recorded step is an earlier one: it must not enter the last-step values
    r0, r1 = run_two(last_step_worker, tmp_path, "last")
    assert r0 == r1
    assert r0["collapse/d/act/dormant_fraction_last_step"] == pytest.approx(10 / 16)
    assert (r0["collapse/vq/usage_recent"], r0["collapse/vq/usage_recent_steps"]) == (0.25, 1)
    assert r0["collapse/vae/active_fraction_last_step"] == 0.25


def hanging_worker(rank, init, out_dir):
    with process_group(rank, init):
        if rank == 0:
            time.sleep(3600)


def test_a_hung_rank_fails_within_the_deadline_with_its_stack_and_is_killed(tmp_path):
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="hanging_worker still running") as failed:
        run_two(hanging_worker, tmp_path, "never", deadline=2.0)
    assert time.monotonic() - start < 300  # spawning, 2 s, the stacks: not the 600 s timeout
    assert "in hanging_worker" in str(failed.value)  # rank 0's Python stack
    assert not mp.active_children()


def _lm_calls(rank: int):
    """Each rank's (logits, labels, ids) per step; rank 1 has no batch at step 1."""
    g = torch.Generator().manual_seed(100 + rank)
    calls = []
    for step in range(3):
        if rank == 1 and step == 1:
            calls.append(None)
            continue
        z = torch.randn(4, 6, 11, generator=g) * 3
        labels = torch.randint(0, 11, (4, 6), generator=g)
        labels[:, :2] = -100
        ids = torch.randint(0, 11, (4, 6), generator=g)
        ids[:, :2] = ids[0, :2]  # one prompt, 4 completions
        calls.append((z, labels, ids))
    return calls


def lm_worker(rank, init, out_dir):
    with process_group(rank, init):
        model = nn.ModuleDict({"head": nn.Identity(), "lm": nn.Identity()})
        mon = CollapseMonitor(
            model,
            [
                probes.TokenEntropy("head", tokens=None, name="e"),
                probes.GenerationDiversity("lm", group_size=4, vocab_size=11, name="div"),
            ],
            3,
            observe_every_n_steps=1,  # (TokenEntropy is a sampled probe: every step here)
        )
        metrics = None
        for call in _lm_calls(rank):
            if call is not None:
                z, labels, ids = call
                with mon.observe(targets=labels):
                    model["head"](z)
                    model["lm"](ids)
            metrics = mon.step() or metrics
        mon.close()
        torch.save(metrics, os.path.join(out_dir, f"lm{rank}.pt"))


def test_token_entropy_and_diversity_on_two_ranks_equal_one_process(tmp_path):
    # rank 1 sees no batch at step 1 and still takes part; the window equals the references
    # over both ranks' calls
    r0, r1 = run_two(lm_worker, tmp_path, "lm")
    assert r0 == r1
    calls = [c for rank in (0, 1) for c in _lm_calls(rank) if c is not None]
    z = torch.cat([c[0] for c in calls])
    labels = torch.cat([c[1] for c in calls])
    ids = torch.cat([c[2] for c in calls])
    want = F.token_entropy_metrics(z, labels != -100)
    assert r0["collapse/e/tokens"] == want["tokens"] == 5 * 16
    for key in ("entropy_mean", "entropy_std", "entropy_upper95"):
        assert r0[f"collapse/e/{key}"] == pytest.approx(want[key], rel=1e-6), key
    div = F.generation_diversity(ids, labels != -100, torch.arange(len(ids)) // 4)
    assert r0["collapse/div/groups"] == div["groups"] == 5
    for key in ("distinct_1", "distinct_2", "pairwise_overlap", "identical_fraction"):
        assert r0[f"collapse/div/{key}"] == pytest.approx(div[key], rel=1e-12), key


def unsynced_codebook_worker(rank, init, out_dir):
    import logging

    from vector_quantize_pytorch import VectorQuantize

    torch.manual_seed(0)
    before = VectorQuantize(dim=4, codebook_size=8)  # sync_codebook: off (no group yet)
    warned = []

    class Said(logging.Handler):
        def emit(self, record):
            warned.append(record.getMessage())

    handler = Said(level=logging.WARNING)
    logging.getLogger("collapse_monitor").addHandler(handler)
    with process_group(rank, init):
        # (the library decided sync_codebook once, when `before` was built: off for all)
        after = VectorQuantize(dim=4, codebook_size=8)
        synced = VectorQuantize(dim=4, codebook_size=8, sync_codebook=True)
        learned = VectorQuantize(dim=4, codebook_size=8, learnable_codebook=True, ema_update=False)
        # (a learned codebook whose dead codes each rank replaces from its own batch)
        replaced = VectorQuantize(
            dim=4,
            codebook_size=8,
            learnable_codebook=True,
            ema_update=False,
            threshold_ema_dead_code=2,
        )
        said = {}
        built = {
            "before": before,
            "after": after,
            "synced": synced,
            "learned": learned,
            "replaced": replaced,
        }
        for name, vq in built.items():
            warned.clear()
            model = nn.Sequential()
            model.add_module("vq", vq)
            CollapseMonitor(model, [probes.CodebookUsage("vq", 8)], 2).close()
            said[name] = [w for w in warned if "sync_codebook" in w]
        torch.save(said, os.path.join(out_dir, f"vq{rank}.pt"))


def test_an_unsynced_ema_codebook_under_ddp_is_said_when_the_monitor_is_built(tmp_path):
    """vector-quantize-pytorch decides once per process, when its first VectorQuantize is
    built, whether EMA codebooks are all-reduced: built before the process group, none is, the
    ranks' codebooks drift apart and pooled usage is no one model's. The monitor says so (not
    for a codebook synced explicitly, nor a learned one)."""
    for said in run_two(unsynced_codebook_worker, tmp_path, "vq"):
        for name in ("before", "after", "replaced"):
            assert len(said[name]) == 1 and "'vq._codebook'" in said[name][0]
        assert said["synced"] == [] and said["learned"] == []
