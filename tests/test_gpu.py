"""On a CUDA device (skipped elsewhere): the monitored hot path never makes the host wait."""

import pytest
import torch

from collapse_monitor import CollapseMonitor
from tests.zoo import Zoo, batch, every_mitigation, every_probe, loss_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LOG_EVERY = 5


def train(mon, steps, sync_debug):
    """Run ``steps`` training steps of the zoo; under ``sync_debug`` any host sync raises."""
    model = mon.model if mon is not None else Zoo().cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = [tuple(t.cuda() for t in batch(s)) for s in range(steps)]
    logged = []
    for s, (x, y, groups) in enumerate(data):
        debug = sync_debug and (mon is None or (s + 1) % LOG_EVERY != 0)
        torch.cuda.set_sync_debug_mode("error" if debug else "default")
        try:
            if mon is None:
                loss = loss_of(model(x), y)
            else:
                with mon.observe(targets=y, groups=groups):
                    loss = loss_of(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if mon is not None:
                logged.append(bool(mon.step(optimizer=opt)))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return logged


def test_the_unmonitored_loop_itself_never_synchronises():
    # the premise of the next test: any sync it reports comes from the monitor
    train(None, 2 * LOG_EVERY, sync_debug=True)


@pytest.mark.parametrize("codebook", ["reset", "every_step", "simvq"])
def test_steps_between_logs_never_synchronise_with_every_probe_and_mitigation(codebook):
    model = Zoo().cuda()
    mon = CollapseMonitor(
        model,
        every_probe(),
        LOG_EVERY,
        mitigations=every_mitigation(codebook=codebook),
        observe_every_n_steps=1,  # every probe records every step
    )
    # two windows: the second starts with state made on the device at the first log
    logged = train(mon, 2 * LOG_EVERY, sync_debug=True)
    assert logged == [False] * (LOG_EVERY - 1) + [True] + [False] * (LOG_EVERY - 1) + [True]
    mon.close()


def test_an_overhead_budget_measures_device_time_without_synchronising_between_logs():
    """The budget's CUDA events are recorded, not waited for, between logs; at a log it reads
    them (the device time of the probes' kernels) and logs the overhead."""
    model = Zoo().cuda()
    mon = CollapseMonitor(model, every_probe(), LOG_EVERY, overhead_budget=0.01)
    logged = train(mon, 3 * LOG_EVERY, sync_debug=True)
    assert logged.count(True) == 3
    out = mon.compute()
    assert out  # (compute() after the windows: the monitor still reads out)
    budget = mon._probes.budget
    assert budget.overhead is not None and budget.overhead > 0
    mon.close()


def test_lightning_fsdp_strategy_gathers_through_the_wrapper(tmp_path):
    """Lightning's strategy="fsdp" (first generation, CUDA only) wraps the module after the
    callback's setup: the callback points the monitor at the wrapper (``sharded_by``), so every
    probe and mitigation reads and writes whole parameters."""
    from tests.scripts.lightning_fsdp import fit

    fit(str(tmp_path), "fsdp", 1, 10, accelerator="cuda")
    state = torch.load(tmp_path / "fsdp0.pt", weights_only=False)
    assert state["mitigations"]["reset_dead_codes"] > 0


def test_flex_attention_trained_on_the_gpu_equals_the_float64_reference():
    """FlexAttention has a backward only on the GPU: a training step through
    ``torch.compile(flex_attention)`` with a sliding-window mask and an ALiBi bias, observed,
    gives the float64 reference of tests/probes/test_attention_flex.py."""
    from torch import nn
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from collapse_monitor import probes
    from tests.probes.test_attention_flex import (
        DENSE_MASK,
        DENSE_SCORE,
        SLOPES,
        SDPAAttention,
        T,
        reference,
        sliding,
    )

    slopes = SLOPES.cuda()

    def alibi(score, b, h, q, kv):  # (the bias on the device of the scores)
        return score - slopes[h] * (q - kv)

    compiled = torch.compile(flex_attention)

    class Block(SDPAAttention):
        def forward(self, x):
            q, k, v = self.qk(x)
            return compiled(q, k, v, alibi, self.block_mask).transpose(1, 2).flatten(2)

    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("attn", Block().cuda())
    m.attn.block_mask = create_block_mask(sliding, None, None, T, T, "cuda", BLOCK_SIZE=16)
    attn = probes.AttentionEntropy("attn", queries=None, name="attn")
    mon = CollapseMonitor(m, [attn], 10**6, observe_every_n_steps=1)
    x = torch.randn(2, T, 32, device="cuda")
    with mon.observe():
        m(x).pow(2).mean().backward()
    got = mon.compute()
    mon.close()
    q, k, _ = m.attn.qk(x)
    want = reference(
        q.cpu(), k.cpu(), DENSE_MASK["sliding"].expand(2, 4, T, T), DENSE_SCORE["alibi"]
    )
    ent = torch.tensor([got[f"collapse/attn/attn/entropy/head_{h}"] for h in range(4)])
    torch.testing.assert_close(ent.double(), want["entropy"], rtol=1e-4, atol=1e-5)


def test_float32_gram_on_the_gpu_is_ieee_even_with_tf32_allowed():
    """The float32 path (the default on GPUs with slow float64) equals the float64 reference
    with TF32 allowed globally: the monitor's GEMMs turn it off for themselves."""
    from collapse_monitor import functional as F
    from collapse_monitor.functional._precision import FAST_FLOAT64, matmul_dtype
    from collapse_monitor.stats import ClassMoments
    from tests.functional.test_neural_collapse import clustered
    from tests.reference import assert_metrics_close
    from tests.stats.test_class_moments import KEYS, readout

    fast = torch.cuda.get_device_capability() in FAST_FLOAT64  # (the lent H100/H200: fast)
    assert matmul_dtype(None, torch.device("cuda")) == (torch.float64 if fast else torch.float32)
    x, y = clustered(20, 256, 8000, noise=1e-3, offset=1e3)
    x = x.float()
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 for float32 GEMMs
    try:
        st = ClassMoments(20, matmul_dtype=torch.float32)
        for i in range(0, 8000, 1000):
            st.update(x[i : i + 1000].cuda(), y[i : i + 1000].cuda())
        got = readout(st.to("cpu"))
    finally:
        torch.set_float32_matmul_precision(saved)
    assert_metrics_close(got, F.neural_collapse(x, y, 20), rtol=1e-6, keys=KEYS)


def test_deepspeed_zero3_on_the_gpu_equals_the_plain_model(monkeypatch):
    """DeepSpeed ZeRO-3 on the GPU (one process, NCCL, every parameter partitioned): the probes
    of tests/test_deepspeed.py log what the plain model logs on the same batches (a learning
    rate of 0), NeuralCollapse's classifier gathered at the readout."""
    deepspeed = pytest.importorskip("deepspeed")
    from torch import nn

    from tests.test_deepspeed import Net, config, data, watched

    def run(model, forward, step):
        mon = CollapseMonitor(model, watched(), 2, observe_every_n_steps=1)
        logs = []
        for s in range(4):
            x, y = (t.cuda() for t in data(s, 0))
            with mon.observe(targets=y):
                loss = nn.functional.cross_entropy(forward(x), y)
            step(loss)
            logged = mon.step()
            if logged is not None:
                logs.append(logged)
        mon.close()
        return logs

    net = Net().cuda()
    want = run(net, net, lambda loss: loss.backward())
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    for k, v in {**env, "MASTER_PORT": "29533"}.items():
        monkeypatch.setenv(k, v)
    deepspeed.init_distributed(dist_backend="nccl")
    try:
        net = Net().cuda()
        opt = torch.optim.AdamW(net.parameters(), lr=0.0)
        engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config=config(3))
        assert hasattr(net.head.weight, "ds_id")
        got = run(engine, engine, lambda loss: (engine.backward(loss), engine.step()))
        engine.destroy()
    finally:
        torch.distributed.destroy_process_group()
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-7), k
