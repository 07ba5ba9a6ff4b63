"""TokenEntropy: streamed = the float64 whole-tensor reference, masks as language models write
them, and the sampled mode's estimate and interval."""

import math

import pytest
import torch
from torch import nn

from collapse_monitor import CollapseMonitor, probes
from collapse_monitor import functional as MF
from tests.probes.test_conventions import run, tiny
from tests.stats.test_class_moments import random_split


def head_model():
    m = nn.Sequential()
    m.add_module("head", nn.Identity())  # stands for the LM head: its input is its output
    return m


def stream(probe, batches, log_every=10**6):
    """Feed ``(logits, targets, mask)`` calls, several per step; returns the last log."""
    model = head_model()
    mon = CollapseMonitor(model, [probe], log_every, strict=True, observe_every_n_steps=1)
    out = None
    for step in batches:
        for z, y, mask in step:
            kw = {k: v for k, v in (("targets", y), ("mask", mask)) if v is not None}
            with mon.observe(**kw):
                model.head(z)
        out = mon.step() or out
    out = out or mon.compute()
    mon.close()
    return out


def test_chunked_entropy_equals_the_reference_for_any_chunk():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 1000, generator=g, dtype=torch.float64) * 4
    z[0, 10:] = -math.inf  # 10 tokens possible
    z[1] = 0.0  # uniform: log V
    ref = MF.token_entropy(z)
    assert ref[1] == pytest.approx(math.log(1000), rel=1e-12)
    assert ref[0] == pytest.approx(MF.token_entropy(z[0, :10]).item(), rel=1e-12)
    for chunk in (1, 7, 333, 1000, 5000):
        assert torch.allclose(MF.chunked_entropy(z, chunk), ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(MF.chunked_entropy(z.float(), 64).double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_mode_streamed_equals_the_whole_tensor_reference(seed, dtype):
    # uneven calls split at random over 3 steps, ignored labels, a batch where nothing counts
    g = torch.Generator().manual_seed(seed)
    V, B, T = 300, 6, 11
    z = (torch.randn(B, T, V, generator=g) * torch.rand(B, T, 1, generator=g) * 12).to(dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    y[torch.rand(B, T, generator=g) < 0.3] = -100
    y[2] = -100
    sizes = random_split(B, 4, seed)
    parts = list(zip(z.split(sizes), y.split(sizes)))
    steps = [[(a, b, None) for a, b in parts[:2]], [(a, b, None) for a, b in parts[2:3]],
             [(a, b, None) for a, b in parts[3:]]]  # fmt: skip
    got = stream(probes.TokenEntropy("head", tokens=None, chunk=64, name="e"), steps)
    want = MF.token_entropy_metrics(z, y != -100)
    assert got["collapse/e/tokens"] == want["tokens"] == int((y != -100).sum())
    assert got["collapse/e/entropy_mean"] == pytest.approx(want["entropy_mean"], rel=1e-6)
    assert got["collapse/e/entropy_mean_ci95"] == 0.0
    h = MF.token_entropy(z.double())[y != -100]
    assert want["entropy_std"] == pytest.approx(h.std().item(), rel=1e-6)
    t95 = {34: 1.6909243, 35: 1.6895725, 39: 1.6848751}[len(h) - 1]  # scipy's t.ppf(0.95)
    bound = h.mean().item() + t95 * h.std().item() / math.sqrt(len(h))
    assert want["entropy_upper95"] == pytest.approx(bound, rel=1e-6)
    for key in ("certain_fraction", "high_fraction", "entropy_std", "entropy_upper95"):
        assert got[f"collapse/e/{key}"] == pytest.approx(want[key], rel=1e-6, abs=1e-12)
    for q in (10, 50, 90):  # the same 0.01-nat histogram: within a bin of each other
        assert abs(got[f"collapse/e/entropy_q{q}"] - want[f"entropy_q{q}"]) <= 0.01
    # and the reference's quantiles are the order statistics (the q N-th smallest) to one bin
    h = MF.token_entropy(z)[y != -100].sort().values
    for q in (0.1, 0.5, 0.9):
        order = h[math.ceil(q * len(h)) - 1].item()
        assert abs(want[f"entropy_q{round(q * 100)}"] - order) <= 0.01 + 1e-9


def test_known_answers_uniform_certain_and_bad_rows():
    z = torch.zeros(1, 4, 50)
    z[0, 1, 3] = 100.0  # certain
    z[0, 2, 0] = float("nan")  # a diverged row: skipped, counted
    got = stream(probes.TokenEntropy("head", tokens=None, name="e"), [[(z, None, None)]])
    assert got["collapse/e/tokens"] == 3 and got["collapse/e/skipped"] == 1
    assert got["collapse/e/entropy_mean"] == pytest.approx(2 * math.log(50) / 3, rel=1e-6)
    assert got["collapse/e/certain_fraction"] == pytest.approx(1 / 3)
    assert got["collapse/e/high_fraction"] == pytest.approx(2 / 3)


def test_sampled_mode_is_unbiased_and_its_interval_covers_the_exact_mean():
    # 3 steps of 4 calls, 40-120 tokens each, 8 drawn per call; 200 seeds of the draw
    g = torch.Generator().manual_seed(0)
    steps = []
    for _ in range(3):
        calls = []
        for _ in range(4):
            n = int(torch.randint(40, 120, (), generator=g))
            z = torch.randn(1, n, 64, generator=g) * torch.rand(1, n, 1, generator=g) * 8
            y = torch.randint(0, 64, (1, n), generator=g)
            y[0, : n // 4] = -100  # a prompt
            calls.append((z, y, None))
        steps.append(calls)
    exact = stream(probes.TokenEntropy("head", tokens=None, name="e"), steps)
    mean, tokens = exact["collapse/e/entropy_mean"], exact["collapse/e/tokens"]
    estimates, covered = [], 0
    for seed in range(200):
        got = stream(probes.TokenEntropy("head", tokens=8, seed=seed, name="e"), steps)
        assert got["collapse/e/tokens"] == pytest.approx(tokens)  # n / k weights: exact counts
        assert got["collapse/e/sampled"] == 8 * 12
        est, ci = got["collapse/e/entropy_mean"], got["collapse/e/entropy_mean_ci95"]
        estimates.append(est)
        covered += abs(est - mean) <= ci
    avg = sum(estimates) / len(estimates)
    sd = math.sqrt(sum((e - avg) ** 2 for e in estimates) / (len(estimates) - 1))
    assert abs(avg - mean) < 3 * sd / math.sqrt(len(estimates))  # unbiased
    assert 0.9 <= covered / 200 <= 0.99  # a calibrated 95% interval


@pytest.mark.parametrize("tokens", [None, 32])
def test_the_upper_bound_covers_the_policys_mean_entropy(tokens):
    # a "policy": 20000 token rows, mostly near-certain with a few uncertain ones (the skewed
    # spread of a sharpening policy); each window draws 2 calls of 100 of them: the bound is
    # above the pool's mean (the policy's expected entropy) in about 95% of 300 windows (a t
    # bound on a right-skewed spread covers a little less: 91-95% measured)
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(20000, 32, generator=g) * 12
    pool[torch.rand(20000, generator=g) < 0.15] /= 12  # uncertain tokens
    mu = MF.token_entropy(pool.double()).mean().item()
    above = 0
    for seed in range(300):
        pick = torch.randint(0, 20000, (2, 1, 100), generator=g)
        steps = [[(pool[i], None, None) for i in pick]]
        got = stream(probes.TokenEntropy("head", tokens=tokens, seed=seed, name="e"), steps)
        assert got["collapse/e/entropy_upper95"] >= got["collapse/e/entropy_mean"]
        above += got["collapse/e/entropy_upper95"] >= mu
    assert 0.9 <= above / 300 <= 0.99


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_causal_lm_counts_completion_tokens_with_either_padding(side):
    # Llama from a config, labels = input_ids with the prompt at -100 and padding at -100:
    # no argument; by hand: logits at t against the label at t + 1, both positions real
    pytest.importorskip("transformers")
    model = tiny("Llama", vocab_size=40, num_hidden_layers=1)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    labels = ids.clone()
    for b, (pad, prompt) in enumerate([(4, 2), (0, 3), (2, 5)]):
        padded = slice(0, pad) if side == "left" else slice(10 - pad, 10)
        mask[b, padded] = 0
        labels[b, padded] = -100
        start = pad if side == "left" else 0
        labels[b, start : start + prompt] = -100
    feed = {
        "forward": lambda s: model(ids, attention_mask=mask),
        "observe": {"targets": labels},
    }
    got = run(model, [probes.TokenEntropy("lm_head", tokens=None, name="e")], feed)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits[:, :-1]
    keep = (labels[:, 1:] != -100) & mask[:, :-1].bool() & mask[:, 1:].bool()
    want = MF.token_entropy_metrics(logits, keep)
    assert got["collapse/e/tokens"] == want["tokens"] == int(keep.sum())
    assert got["collapse/e/entropy_mean"] == pytest.approx(want["entropy_mean"], rel=1e-6)


def test_logits_to_keep_and_a_completion_mask():
    # logits of the last 4 positions only (logits_to_keep): full-length labels right-aligned;
    # observe(mask=) marks the predicted tokens that count (a completion mask)
    pytest.importorskip("transformers")
    model = tiny("Llama", vocab_size=40, num_hidden_layers=1)
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[1, -1] = -100
    completion = torch.zeros(2, 9, dtype=torch.bool)
    completion[:, 6:] = True  # the completion: the last 3 tokens
    feed = {
        "forward": lambda s: model(ids, logits_to_keep=4),
        "observe": {"targets": labels, "mask": completion},
    }
    got = run(model, [probes.TokenEntropy("lm_head", tokens=None, name="e")], feed)
    with torch.no_grad():
        full = model(ids).logits
    # positions 5..7 predict tokens 6..8 (position 8 predicts nothing)
    keep = completion[:, 6:] & (labels[:, 6:] != -100)
    want = MF.token_entropy_metrics(full[:, 5:8], keep)
    assert got["collapse/e/tokens"] == want["tokens"] == 5
    assert got["collapse/e/entropy_mean"] == pytest.approx(want["entropy_mean"], rel=1e-5)


@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_trls_completion_mask_beside_logits_to_keep_of_one_more_position(path):
    """TRL's GRPO: ``logits_to_keep = C + 1`` and ``completion_mask`` ``(B, C)`` over the C
    completion tokens (left-padded prompts, EOS inside the mask): the C positions that predict
    them count, the last (past the sequence) does not; on the head's logits and on the
    backbone's hidden states (TRL's fused head: the whole sequence)."""
    pytest.importorskip("transformers")
    model = tiny("Llama", vocab_size=40, num_hidden_layers=1)
    B, P, C = 3, 5, 4
    ids = torch.randint(2, 40, (B, P + C), generator=torch.Generator().manual_seed(5))
    attention = torch.ones(B, P + C, dtype=torch.long)
    attention[1, :2] = attention[2, :3] = 0  # left padding of the prompts
    completion = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    feed = {
        "forward": lambda s: model(ids, attention_mask=attention, logits_to_keep=C + 1),
        "observe": {"mask": completion},
    }
    probe = (
        probes.TokenEntropy("lm_head", tokens=None, name="e")
        if path == "logits"
        else probes.TokenEntropy("model", head="lm_head", tokens=None, name="e")
    )
    got = run(model, [probe], feed)
    with torch.no_grad():
        logits = model(ids, attention_mask=attention, logits_to_keep=C + 1).logits[:, :-1]
    want = MF.token_entropy_metrics(logits, completion.bool())
    assert got["collapse/e/tokens"] == want["tokens"] == 7
    assert got["collapse/e/entropy_mean"] == pytest.approx(want["entropy_mean"], rel=1e-6)


def test_equal_to_trls_entropy_from_logits():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 16, 500, generator=g) * 5
    got = stream(probes.TokenEntropy("head", tokens=None, name="e"), [[(z, None, None)]])
    theirs = trl_utils.entropy_from_logits(z).double().mean().item()
    assert got["collapse/e/entropy_mean"] == pytest.approx(theirs, rel=1e-6)


def test_the_interval_uses_students_t_quantile():
    stats = pytest.importorskip("scipy.stats")
    from collapse_monitor.functional.token_entropy import t_quantile

    for dof, tol in (
        (1, 1e-9),
        (2, 1e-9),
        (3, 1e-9),
        (5, 1e-9),
        (30, 1e-9),
        (31, 2e-6),
        (500, 1e-8),
    ):
        for p in (0.975, 0.95, 0.5, 0.025):  # (the interval's; entropy_upper95's; the others)
            assert t_quantile(dof, p) == pytest.approx(stats.t.ppf(p, dof), abs=tol)
    assert t_quantile(math.inf) == pytest.approx(stats.norm.ppf(0.975), abs=1e-12)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("tokens", [None, 5])
def test_the_hidden_state_path_equals_the_logits_path(tied, tokens):
    # the backbone's hidden states and the head's weight (tied to the embeddings or not), with
    # left padding and a prompt at -100; sampled: the same seed draws the same rows
    pytest.importorskip("transformers")
    model = tiny("Llama", vocab_size=50, num_hidden_layers=1, tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100
    feed = {"forward": lambda s: model(ids, attention_mask=mask), "observe": {"targets": labels}}
    pair = [
        probes.TokenEntropy("lm_head", tokens=tokens, temperature=0.7, name="logits"),
        probes.TokenEntropy("model", head="lm_head", tokens=tokens, temperature=0.7, name="h"),
    ]
    got = run(model, pair, feed)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits[:, :-1] / 0.7
    keep = (labels[:, 1:] != -100) & mask[:, :-1].bool() & mask[:, 1:].bool()
    for key in ("tokens", "sampled", "entropy_mean", "entropy_mean_ci95", "certain_fraction"):
        assert got[f"collapse/h/{key}"] == pytest.approx(got[f"collapse/logits/{key}"], rel=1e-5)
    if tokens is None:
        want = MF.token_entropy_metrics(logits, keep)
        assert got["collapse/h/entropy_mean"] == pytest.approx(want["entropy_mean"], rel=1e-5)


def test_the_hidden_state_path_refuses_logits_transformed_after_the_head():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Gemma2Config(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8,
    )  # fmt: skip
    model = transformers.Gemma2ForCausalLM(cfg)
    assert cfg.final_logit_softcapping
    with pytest.raises(ValueError, match="final_logit_softcapping.*probe the logits"):
        CollapseMonitor(model, [probes.TokenEntropy("model", head="lm_head")], 1)
    CollapseMonitor(model, [probes.TokenEntropy("lm_head")], 1).close()  # the logits: fine


def test_logits_to_keep_reads_the_models_padding_right_aligned():
    pytest.importorskip("transformers")
    model = tiny("Llama", vocab_size=40, num_hidden_layers=1)
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, 7:] = 0  # right padding inside the kept positions
    feed = {"forward": lambda s: model(ids, attention_mask=mask, logits_to_keep=4)}
    got = run(model, [probes.TokenEntropy("lm_head", tokens=None, name="e")], feed)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
    keep = mask[:, 5:8].bool() & mask[:, 6:9].bool()  # positions 5..7 predict tokens 6..8
    want = MF.token_entropy_metrics(full[:, 5:8], keep)
    assert got["collapse/e/tokens"] == want["tokens"] == 3 + 1
    assert got["collapse/e/entropy_mean"] == pytest.approx(want["entropy_mean"], rel=1e-5)


@pytest.mark.parametrize("per", ["sequence", "token"])
def test_logprob_and_its_covariance_with_the_advantage_equal_the_reference(per):
    # Cui et al.'s covariance of the sampled token's log-probability with its advantage, over
    # the tokens that count, across uneven calls and steps, in a causal LM (labels shifted)
    pytest.importorskip("transformers")
    model = tiny("Llama", vocab_size=30, num_hidden_layers=1)
    g = torch.Generator().manual_seed(6)
    calls = []
    for b in (3, 2, 4):
        ids = torch.randint(0, 30, (b, 8), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100
        adv = torch.randn(b, generator=g) if per == "sequence" else torch.randn(b, 8, generator=g)
        calls.append((ids, labels, adv))
    mon = CollapseMonitor(
        model, [probes.TokenEntropy("lm_head", tokens=None, name="e")], 10**6,
        strict=True, observe_every_n_steps=1,
    )  # fmt: skip
    for i, (ids, labels, adv) in enumerate(calls):
        with mon.observe(targets=labels, advantages=adv):
            model(ids)
        if i != 1:
            mon.step()
    got = mon.compute()
    mon.close()
    zs, keeps, ys, advs = [], [], [], []
    with torch.no_grad():
        for ids, labels, adv in calls:
            zs.append(model(ids).logits[:, :-1].reshape(-1, 30))
            y = labels[:, 1:]
            keeps.append((y != -100).reshape(-1))
            ys.append(y.reshape(-1))
            a = adv[:, None].expand(-1, 7) if per == "sequence" else adv[:, 1:]
            advs.append(a.reshape(-1))
    want = MF.token_entropy_metrics(
        torch.cat(zs), torch.cat(keeps), targets=torch.cat(ys), advantages=torch.cat(advs)
    )
    for key in ("entropy_mean", "logprob_mean"):
        assert got[f"collapse/e/{key}"] == pytest.approx(want[key], rel=1e-5), key
    # log-probabilities are computed in float32 (about 1e-7 each): the covariance to 1e-6
    cov = got["collapse/e/logprob_advantage_cov"]
    assert cov == pytest.approx(want["logprob_advantage_cov"], abs=1e-6)
    assert abs(want["logprob_advantage_cov"]) > 1e-4  # not zero by construction


def test_a_bfloat16_autocast_forward_does_not_round_the_probes_own_computation():
    # TRL runs its forward under the accelerator's autocast; the probe's head matmul must not
    # inherit it: the same hidden states give the float64 answer to float32 precision
    pytest.importorskip("transformers")
    model = tiny("Llama", vocab_size=40, num_hidden_layers=1)
    ids = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(7))
    states = []
    model.model.register_forward_hook(lambda m, a, o: states.append(o.last_hidden_state))
    probe = probes.TokenEntropy("model", head="lm_head", tokens=None, name="e")
    mon = CollapseMonitor(model, [probe], 1, strict=True)
    with mon.observe(targets=ids), torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids)
    got = mon.step()
    mon.close()
    z = states[0].detach().double()[:, :-1] @ model.lm_head.weight.detach().double().T
    want = MF.token_entropy_metrics(z, targets=ids[:, 1:])
    for key in ("entropy_mean", "logprob_mean"):
        assert got[f"collapse/e/{key}"] == pytest.approx(want[key], rel=2e-6), key


def test_hidden_states_need_head_and_labels_outside_the_vocabulary_are_left_out_and_counted():
    """A label that names no token (past the vocabulary, or negative but not ignore_index) is
    left out and counted in out_of_range: not read as token 0 (a user's check: -5 was), not
    counted as a NaN row."""
    pytest.importorskip("transformers")
    model = tiny("Llama", vocab_size=20, num_hidden_layers=1)
    ids = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(8))
    with pytest.raises(ValueError, match="without logits: pass head="):
        run(model, [probes.TokenEntropy("model", tokens=None)], lambda s: model(ids))
    labels = ids.clone()
    labels[0, 3], labels[1, 2] = 25, -5
    got = run(
        model,
        [probes.TokenEntropy("lm_head", tokens=None, name="e")],
        {"forward": lambda s: model(ids), "observe": {"targets": labels}},
    )
    assert got["collapse/e/out_of_range"] == 2 and got["collapse/e/skipped"] == 0
    assert got["collapse/e/tokens"] == 2 * 5 - 2
    with torch.no_grad():  # by hand: the shifted log-probabilities of the labels that name tokens
        lp = torch.log_softmax(model(ids).logits[:, :-1].double(), -1)
    y = labels[:, 1:]
    keep = (y >= 0) & (y < 20)
    want = lp.gather(-1, y.clamp(0, 19)[..., None])[..., 0][keep].mean()
    assert got["collapse/e/logprob_mean"] == pytest.approx(want.item(), rel=1e-6)


def test_one_sampled_row_gives_no_interval_no_spread_and_no_bound():
    z = torch.randn(1, 20, 30, generator=torch.Generator().manual_seed(9))
    got = stream(probes.TokenEntropy("head", tokens=1, name="e"), [[(z, None, None)]])
    # NaN: not logged (0 would read as an exact mean; the rule skips the window)
    assert got["collapse/e/sampled"] == 1 and got["collapse/e/tokens"] == 20
    for key in ("entropy_mean_ci95", "entropy_std", "entropy_upper95"):
        assert math.isnan(got.get(f"collapse/e/{key}", math.nan))


def test_a_resumed_run_draws_the_rows_an_uninterrupted_run_draws():
    g = torch.Generator().manual_seed(10)
    calls = [torch.randn(2, 30, 40, generator=g) * 3 for _ in range(4)]

    def fresh():
        model = head_model()
        probe = probes.TokenEntropy("head", tokens=7, seed=3, name="e")
        return model, CollapseMonitor(model, [probe], 2, observe_every_n_steps=1)

    def feed(model, mon, zs):
        out = []
        for z in zs:
            with mon.observe():
                model.head(z)
            out.append(mon.step())
        return out

    model, mon = fresh()
    whole = feed(model, mon, calls)
    mon.close()
    model, mon = fresh()
    feed(model, mon, calls[:2])
    state = mon.state_dict()
    mon.close()
    model, mon = fresh()
    mon.load_state_dict(state)
    resumed = feed(model, mon, calls[2:])
    mon.close()
    assert resumed[-1]["collapse/e/entropy_mean"] == whole[-1]["collapse/e/entropy_mean"]
    # a checkpoint from before entropy_std (no sum of squares) taken inside a window resumes:
    # that window's spread and bound are NaN (unknown), the next window's as without a break
    model, mon = fresh()
    feed(model, mon, calls[:1])
    state = mon.state_dict()
    mon.close()
    assert _drop_square(state) == 1
    model, mon = fresh()
    mon.load_state_dict(state)
    logs = feed(model, mon, calls[1:])
    mon.close()
    assert logs[0]["collapse/e/entropy_mean"] == whole[1]["collapse/e/entropy_mean"]
    assert math.isnan(logs[0].get("collapse/e/entropy_std", math.nan))
    assert math.isnan(logs[0].get("collapse/e/entropy_upper95", math.nan))
    for key in ("entropy_std", "entropy_upper95"):
        assert logs[2][f"collapse/e/{key}"] == whole[3][f"collapse/e/{key}"]


def _drop_square(state) -> int:
    """Remove every ``square`` state from a monitor's state (as saved before it existed)."""
    dropped = 0
    if isinstance(state, dict):
        if isinstance(state.get("states"), dict) and "square" in state["states"]:
            del state["states"]["square"]
            dropped += 1
        for value in state.values():
            dropped += _drop_square(value)
    elif isinstance(state, list | tuple):
        dropped += sum(_drop_square(v) for v in state)
    return dropped


def test_labels_longer_than_the_logits_without_logits_to_keep_are_refused():
    z = torch.randn(2, 4, 10)
    with pytest.raises(ValueError, match=r"targets of shape \(2, 6\) do not match"):
        stream(probes.TokenEntropy("head", tokens=None), [[(z, torch.zeros(2, 6).long(), None)]])


@pytest.mark.parametrize("path", ["logits", "hidden", "logit_health"])
def test_one_nan_in_the_head_weight_is_a_diverged_run(path):
    # one NaN entry of the LM head makes one vocabulary column NaN: every row loses its softmax
    # while 1/V of the elements are NaN; from the first step on, the run is called diverged
    pytest.importorskip("transformers")
    model = tiny("Llama", vocab_size=50, num_hidden_layers=1)
    with torch.no_grad():
        model.lm_head.weight[7, 3] = float("nan")
    probe = {
        "logits": probes.TokenEntropy("lm_head", name="p"),
        "hidden": probes.TokenEntropy("model", head="lm_head", name="p"),
        "logit_health": probes.LogitHealth("lm_head", nlm=False, name="p"),
    }[path]
    alerts = []
    mon = CollapseMonitor(model, [probe], 2, observe_every_n_steps=1, on_alert=alerts.append)
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(11))
    for _ in range(2):
        with mon.observe(targets=ids):
            model(ids)
        m = mon.step() or None
    mon.close()
    assert [a.rule for a in alerts] == ["p/diverged"]
    assert "collapse/p/entropy_mean" not in m and "collapse/p/log_z_mean" not in m


@pytest.mark.parametrize("path,cache", [("logits", True), ("hidden", True), ("logits", False)])
def test_rollout_entropy_is_the_sampling_distributions_up_to_each_end(path, cache, caplog):
    # generate() from left-padded prompts of different lengths: the rollout probe reads each
    # step's last position (the distribution the next token is drawn from, at the sampler's
    # temperature), never the rows of a sequence that has ended; the training probe next to it
    # records nothing of generation, and the rollout probe nothing of a training forward.
    # By hand: generate()'s own per-step logits, up to and including each sequence's end token
    pytest.importorskip("transformers")
    V, eos, pad = 30, 1, 0
    model = tiny("Llama", vocab_size=V, num_hidden_layers=1, eos_token_id=eos, pad_token_id=pad)
    with torch.no_grad():  # an end token likely enough that some sequences end early
        model.lm_head.weight[eos] *= 0
        model.lm_head.weight[eos, 0] = 1.5
    ids = torch.randint(2, V, (4, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(4, 6, dtype=torch.long)
    for b, pads in enumerate([0, 2, 4, 1]):
        ids[b, :pads], mask[b, :pads] = pad, 0
    ids[3, -1] = eos  # a prompt that ends with the end token: its sampling starts there
    kw = {"head": "lm_head"} if path == "hidden" else {}
    where = "model" if path == "hidden" else "lm_head"
    rollout = probes.TokenEntropy(where, tokens=None, temperature=0.7, rollout=True, **kw)
    trained = probes.TokenEntropy(where, tokens=None, name="trained", **kw)
    mon = CollapseMonitor(model, [rollout, trained], 1, strict=True)
    torch.manual_seed(3)
    with mon.observe(rollout=True), torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, do_sample=True, temperature=0.7, top_k=0, max_new_tokens=8,
            output_logits=True, return_dict_in_generate=True, use_cache=cache,
        )  # fmt: skip
    got = mon.step()
    z = torch.stack(out.logits, 1).double() / 0.7  # raw logits of every step (B, steps, V)
    new = out.sequences[:, 6:]
    alive = torch.ones_like(new, dtype=torch.bool)
    alive[:, 1:] = (new[:, :-1] != eos).cumprod(1).bool()
    assert 0 < (new == eos).any(1).sum() < 4  # some ended early, some did not
    want = MF.token_entropy_metrics(z, alive)
    assert got[f"collapse/{rollout.name}/tokens"] == want["tokens"] == int(alive.sum())
    got_mean = got[f"collapse/{rollout.name}/entropy_mean"]
    assert got_mean == pytest.approx(want["entropy_mean"], rel=1e-5)
    assert "collapse/trained/entropy_mean" not in got
    with mon.observe():  # a training forward: the trained policy's probe only
        model(ids, attention_mask=mask)
    got = mon.step()
    assert got["collapse/trained/tokens"] > 0 and got[f"collapse/{rollout.name}/tokens"] == 0
    assert f"collapse/{rollout.name}/entropy_mean" not in got
    assert "saw no generation forward" in caplog.text  # said once, for the rollout probe
    with mon.observe(), torch.no_grad():  # generation inside a training block: left out, said
        model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=3)
    assert mon.step()["collapse/trained/tokens"] == 0
    assert "leaves out generation forwards" in caplog.text and "never ran" not in caplog.text
    mon.close()


def test_rollout_needs_the_ids_that_end_a_sequence():
    model = head_model()  # no config names an end token (a trainer may add its tokenizer's)
    mon = CollapseMonitor(model, [probes.TokenEntropy("head", rollout=True)], 1, strict=True)
    with pytest.raises(ValueError, match="end_ids"), mon.observe(rollout=True):
        model.head(torch.randn(2, 3, 5))
    mon.close()
    model = head_model()  # end_ids=(): every row of every step samples
    probe = probes.TokenEntropy("head", tokens=None, rollout=True, end_ids=(), name="e")
    mon = CollapseMonitor(model, [probe], 1)
    z = torch.randn(2, 3, 5, dtype=torch.float64)
    with mon.observe(rollout=True):
        model.head(z)
    got = mon.step()
    want = MF.token_entropy_metrics(z[:, -1], torch.ones(2, dtype=torch.bool))
    assert got["collapse/e/entropy_mean"] == pytest.approx(want["entropy_mean"], rel=1e-9)
    mon.close()
