import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from collapse_monitor import CollapseMonitor, probes
from collapse_monitor import functional as MF
from tests.probes.test_conventions import tiny


class SDPAAttention(nn.Module):
    """nanoGPT-style attention; optional grouped-query heads."""

    def __init__(self, d=32, heads=4, kv_heads=None):
        super().__init__()
        self.h, self.kvh = heads, kv_heads or heads
        self.dh = d // heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * self.kvh * self.dh)

    def qk(self, x):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.h, self.dh).transpose(1, 2)
        k, v = self.kv(x).view(B, T, 2, self.kvh, self.dh).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x, mask=None, causal=False):
        q, k, v = self.qk(x)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.kvh != self.h
        )
        return out.transpose(1, 2).flatten(2)


def probs_reference(q, k, allowed, additive=None):
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if additive is not None:
        s = s + additive
    p = torch.softmax(s.masked_fill(~allowed, -float("inf")), -1).nan_to_num(0.0)
    return MF.attention_entropy(p.detach(), allowed)


def layer_metrics(mon, probe="attn", layer="attn"):
    got = mon.compute()
    pre = f"collapse/{probe}/{layer}/"
    H = max(int(k.rsplit("_", 1)[1]) for k in got if k.startswith(pre + "entropy/head_")) + 1
    ent = torch.tensor([got[f"{pre}entropy/head_{h}"] for h in range(H)], dtype=torch.float64)
    norm = torch.tensor([got[f"{pre}entropy_norm/head_{h}"] for h in range(H)], dtype=torch.float64)
    return ent, norm, got


def watch(model, **kw):
    return CollapseMonitor(
        model, [probes.AttentionEntropy("attn", queries=None, **kw)], 10**6, observe_every_n_steps=1
    )


@pytest.mark.parametrize("case", ["plain", "causal", "bool_padding", "additive", "gqa_causal"])
def test_sdpa_calls_match_explicit_probabilities(case):
    torch.manual_seed(0)
    B, T = 3, 12
    m = nn.Sequential()
    m.add_module("attn", SDPAAttention(kv_heads=2 if case.startswith("gqa") else None))
    x = torch.randn(B, T, 32)
    allowed = torch.ones(B, 1, T, T, dtype=torch.bool)
    mask, additive, causal = None, None, case.endswith("causal")
    if causal:
        allowed &= torch.ones(T, T, dtype=torch.bool).tril()
    if case == "bool_padding":
        allowed[1, ..., 8:] = False  # the second sequence has 4 padded keys
        mask = allowed
    if case == "additive":
        additive = torch.randn(1, 1, T, T)
        additive[..., :, -3:] = -float("inf")
        allowed = allowed & (additive > -float("inf"))
        mask = additive
    mon = watch(m)
    with mon.observe():
        m.attn(x, mask=mask, causal=causal)
    ent, norm, got = layer_metrics(mon)
    q, k, _ = m.attn.qk(x)
    ref = probs_reference(q, k, allowed, additive)
    assert torch.allclose(ent, ref["entropy"], rtol=1e-4)
    assert torch.allclose(norm, ref["entropy_norm"], rtol=1e-4)
    assert got["collapse/attn/attn/overload_fraction"] == ref["overload_fraction"]
    assert got["collapse/attn/attn/max_logit"] > 0


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_matches_its_own_weights(batch_first, training, need_weights):
    torch.manual_seed(0)
    B, T, E = 3, 9, 16
    mha = nn.MultiheadAttention(E, 4, batch_first=batch_first, dropout=0.0)
    mha.train(training)
    m = nn.Sequential()
    m.add_module("attn", mha)
    x = torch.randn(B, T, E) if batch_first else torch.randn(T, B, E)
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[0, 6:] = True
    causal = ~torch.ones(T, T, dtype=torch.bool).tril()  # True = masked, MHA's convention
    mon = watch(m)
    with mon.observe(), torch.set_grad_enabled(training):
        mha(x, x, x, key_padding_mask=kpm, attn_mask=causal, need_weights=need_weights)
    ent, norm, _ = layer_metrics(mon)
    _, w = mha(
        x,
        x,
        x,
        key_padding_mask=kpm,
        attn_mask=causal,
        need_weights=True,
        average_attn_weights=False,
    )
    allowed = (~kpm)[:, None, None, :] & ~causal[None, None]
    # self-attention: the padded keys are padded queries too, left out of the averages
    ref = MF.attention_entropy(w.detach(), allowed, queries=~kpm)
    assert torch.allclose(ent, ref["entropy"], rtol=1e-4)
    assert torch.allclose(norm, ref["entropy_norm"], rtol=1e-4)


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_layer_including_the_fast_path(norm_first):
    torch.manual_seed(0)
    B, T, E = 2, 7, 16
    layer = nn.TransformerEncoderLayer(
        E, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first
    )
    m = nn.Sequential()
    m.add_module("enc", layer)
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[1, 5:] = True
    x = torch.randn(B, T, E)
    results = []
    for training in (True, False):
        layer.train(training)
        mon = CollapseMonitor(
            m,
            [probes.AttentionEntropy("enc", queries=None, name="attn")],
            10**6,
            observe_every_n_steps=1,
        )
        with mon.observe(), torch.set_grad_enabled(training):  # eval + no_grad: the fast path
            layer(x, src_key_padding_mask=kpm)
        results.append(layer_metrics(mon, layer="enc.self_attn"))
        mon.close()
    h = layer.norm1(x) if norm_first else x
    _, w = layer.self_attn(
        h, h, h, key_padding_mask=kpm, need_weights=True, average_attn_weights=False
    )
    ref = MF.attention_entropy(w.detach(), (~kpm)[:, None, None, :], queries=~kpm)
    for ent, norm, _ in results:
        assert torch.allclose(ent, ref["entropy"], rtol=1e-4)
        assert torch.allclose(norm, ref["entropy_norm"], rtol=1e-4)


def test_an_is_causal_hint_without_a_mask_is_read_as_the_fast_path_runs_it():
    """PyTorch's fast path (eval, no autograd) ignores ``is_causal`` without a mask and attends
    to every key (its slow path raises); the entropy is that of the attention that ran."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    m = nn.Sequential()
    m.add_module("attn", layer)
    x = torch.randn(2, 6, 16)
    mon = watch(m)
    with mon.observe(), torch.no_grad():
        out = layer(x, is_causal=True)
        assert torch.allclose(out, layer(x), atol=1e-6)  # (what ran: full attention)
    ent, _, _ = layer_metrics(mon, layer="attn.self_attn")
    _, w = layer.self_attn(x, x, x, need_weights=True, average_attn_weights=False)
    ref = MF.attention_entropy(w.detach(), torch.ones(1, 1, 6, 6, dtype=torch.bool))
    assert torch.allclose(ent, ref["entropy"], rtol=1e-4)


def test_a_transformer_encoders_nested_fast_path_in_a_snapshot(caplog):
    """``nn.TransformerEncoder`` (``enable_nested_tensor=True``, the default) in eval mode hands
    its layers nested tensors without the padding: attention and token uniformity read them
    padded again (equal to the references over the real tokens), and so do the probes that read
    token padding; a mask of other tokens than the padding cannot be placed in the packed rows:
    left out with a warning; none is disabled and training windows go on."""
    torch.manual_seed(0)
    B, T, E = 3, 6, 16
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, 2, 32, 0.0, batch_first=True), 2)
    m = nn.Sequential()
    m.add_module("enc", enc)
    kpm = torch.arange(T)[None, :] >= torch.tensor([6, 4, 3])[:, None]
    x = torch.randn(B, T, E)
    mon = CollapseMonitor(
        m,
        [
            probes.AttentionEntropy("enc", queries=None, name="attn"),
            probes.TokenUniformity("enc.layers.0", name="tu"),
            probes.RepresentationRank("enc.layers.0", name="rank"),
        ],
        10**6,
        observe_every_n_steps=1,
    )
    enc.eval()
    with torch.no_grad(), mon.snapshot("val") as val:
        with mon.observe(mask=~kpm):
            enc(x, src_key_padding_mask=kpm)
    assert mon.error_count == 0
    layer = enc.layers[0]
    _, w = layer.self_attn(x, x, x, key_padding_mask=kpm, average_attn_weights=False)
    ref = MF.attention_entropy(w.detach(), (~kpm)[:, None, None, :], queries=~kpm)
    got = [val[f"val/collapse/attn/enc.layers.0.self_attn/entropy/head_{h}"] for h in range(2)]
    assert torch.allclose(torch.tensor(got, dtype=torch.float64), ref["entropy"], rtol=1e-5)
    with torch.no_grad():
        h = layer(x, src_key_padding_mask=kpm)
    r_f = MF.token_uniformity(h, ~kpm)[1].mean().item()
    assert val["val/collapse/tu/enc.layers.0/r_f"] == pytest.approx(r_f, rel=1e-6)
    rank = MF.representation_rank(h[~kpm])  # the real tokens' embeddings
    assert val["val/collapse/rank/samples"] == int((~kpm).sum())
    assert val["val/collapse/rank/erank"] == pytest.approx(rank["erank"], rel=1e-6)
    other = ~kpm & (torch.arange(T) > 0)  # other tokens than the padding: cannot be placed
    with torch.no_grad(), mon.snapshot("val") as val2:
        with mon.observe(mask=other):
            enc(x, src_key_padding_mask=kpm)
    assert val2["val/collapse/tu/calls"] == val2["val/collapse/rank/calls"] == 0
    assert "nested tensors" in caplog.text and mon.error_count == 0
    enc.train()  # the training windows after it still record every probe
    with mon.observe(targets=None, mask=~kpm):
        enc(x, src_key_padding_mask=kpm)
    out = mon.compute()
    assert "collapse/tu/enc.layers.0/r_f" in out and "collapse/rank/erank" in out
    assert "collapse/attn/enc.layers.1.self_attn/entropy/head_0" in out
    mon.close()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_transformers_models_with_sdpa_match_eager_attentions(arch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=64, n_positions=32)
        cls, glob = transformers.GPT2LMHeadModel, "transformer.h.*.attn"
    else:
        cfg = transformers.LlamaConfig(
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            hidden_size=32,
            intermediate_size=64,
            vocab_size=64,
        )
        cls, glob = transformers.LlamaForCausalLM, "model.layers.*.self_attn"
    cfg._attn_implementation = "sdpa"
    model = cls(cfg).eval()
    ids = torch.randint(0, 64, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding in the second sequence
    mon = CollapseMonitor(
        model,
        [probes.AttentionEntropy(glob, queries=None, name="attn")],
        10**6,
        observe_every_n_steps=1,
    )
    with mon.observe(), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    got = mon.compute()
    model.config._attn_implementation = "eager"
    for layer in model.modules():
        if hasattr(layer, "config"):
            layer.config._attn_implementation = "eager"
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    allowed = causal[None, None] & mask.bool()[:, None, None, :]
    names = sorted({k.split("/")[2] for k in got if "/entropy/head_" in k})
    assert len(names) == 2
    for name, probs in zip(names, eager):
        ent = torch.tensor(
            [got[f"collapse/attn/{name}/entropy/head_{h}"] for h in range(4)], dtype=torch.float64
        )
        ok = allowed.sum(-1, keepdim=True).expand_as(allowed) > 0
        ref = MF.attention_entropy(probs, allowed & ok)
        assert torch.allclose(ent, ref["entropy"], rtol=1e-4), name


def test_explicit_probabilities_through_extract():
    class Eager(nn.Module):
        def forward(self, q, k):
            s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            causal = torch.ones(s.shape[-2:], dtype=torch.bool).tril()
            return torch.softmax(s.masked_fill(~causal, -float("inf")), -1)

    m = nn.Sequential()
    m.add_module("attn", Eager())
    mon = CollapseMonitor(
        m,
        [probes.AttentionEntropy("attn", extract=lambda mod, a, out: out, causal=True)],
        10**6,
        observe_every_n_steps=1,
    )
    q, k = torch.randn(2, 3, 8, 4), torch.randn(2, 3, 8, 4)
    with mon.observe():
        p = m.attn(q, k)
    ent, norm, _ = layer_metrics(mon)
    ref = MF.attention_entropy(p, torch.ones(8, 8, dtype=torch.bool).tril())
    assert torch.allclose(ent, ref["entropy"], rtol=1e-9) and torch.allclose(
        norm, ref["entropy_norm"], rtol=1e-9
    )


def test_sampled_queries_are_unbiased():
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("attn", SDPAAttention())
    x = torch.randn(2, 64, 32) * 3
    exact = watch(m)
    with exact.observe():
        m.attn(x)
    full, _, _ = layer_metrics(exact)
    exact.close()
    estimates = []
    for seed in range(40):
        mon = CollapseMonitor(
            m,
            [probes.AttentionEntropy("attn", queries=8, seed=seed)],
            10**6,
            observe_every_n_steps=1,
        )
        with mon.observe():
            m.attn(x)
        estimates.append(layer_metrics(mon)[0])
        mon.close()
    est = torch.stack(estimates)
    se = est.std(0) / math.sqrt(len(estimates))
    assert ((est.mean(0) - full).abs() < 3 * se).all()
    assert (se > 0).all()


def test_nothing_happens_outside_observe_and_close_removes_the_mode():
    m = nn.Sequential()
    m.add_module("attn", SDPAAttention())
    mon = watch(m)
    m.attn(torch.randn(1, 5, 32))
    assert mon.compute() == {"collapse/attn/calls": 0.0, "collapse/errors": 0.0}
    mon.close()
    assert not torch.overrides._get_current_function_mode_stack()


def test_a_selection_without_attention_is_an_error_naming_it():
    m = nn.Sequential()
    m.add_module("mlp", nn.Linear(4, 4))
    mon = CollapseMonitor(
        m, [probes.AttentionEntropy("mlp")], 1, strict=True, observe_every_n_steps=1
    )
    with mon.observe():
        m(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"no attention.*'mlp' \(Linear\)"):
        mon.step()


def test_collapsed_attention_with_huge_logits_keeps_entropy_accurate():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 16, 40, generator=g) * 3e4  # attention logits of a collapsed layer
    allowed = torch.rand(2, 1, 16, 40, generator=g) > 0.3
    H, n = MF.entropy_from_logits(logits, allowed)
    ref, _ = MF.entropy_from_probs(
        torch.softmax(logits.double().masked_fill(~allowed, -float("inf")), -1), allowed
    )
    assert (H >= 0).all()
    assert torch.allclose(H.double(), ref, atol=1e-6)


def test_a_collapse_inside_the_window_alerts_at_that_log_from_its_last_step():
    # probabilities given explicitly: 2 steps at entropy_norm ~0.38, then 8 at ~0.08. The
    # window's mean (0.138) is below 0.15 but above the severe 0.1: alone it needs a second
    # log; the last step (0.08, float64 by hand) shows the crossing lasted to the window's end
    def rows(top):
        p = torch.full((1, 2, 4, 16), (1 - top) / 15, dtype=torch.float64)
        p[..., 0] = top
        return p

    def norm(p):
        return float(-(p * p.log()).sum(-1).mean() / math.log(16))

    m = nn.Sequential()
    m.add_module("attn", nn.Identity())
    alerts = []
    mon = CollapseMonitor(
        m,
        [probes.AttentionEntropy("attn", extract=lambda mod, a, out: out, name="attn")],
        10,
        observe_every_n_steps=1,
        on_alert=alerts.append,
    )
    mid, sharp = rows(0.8), rows(0.97)
    for p in [mid] * 2 + [sharp] * 8:
        with mon.observe():
            m.attn(p)
        metrics = mon.step()
    mon.close()
    window = (2 * norm(mid) + 8 * norm(sharp)) / 10
    assert 0.1 < window < 0.15
    assert metrics["collapse/attn/attn/entropy_norm"] == pytest.approx(window, rel=1e-9)
    last = metrics["collapse/attn/attn/entropy_norm_last_step"]
    assert last == pytest.approx(norm(sharp), rel=1e-9)
    assert [(a.step, a.rule) for a in alerts] == [(10, "attn/entropy_collapse")]


def test_a_bfloat16_autocast_forward_does_not_round_the_recomputed_scores():
    # the probe recomputes q k' in float32 from the q and k the model used, also when the
    # model's forward runs under autocast (which would make that matmul bfloat16)
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("attn", SDPAAttention())
    x = torch.randn(2, 16, 32) * 4
    mon = watch(m)
    with mon.observe(), torch.autocast("cpu", dtype=torch.bfloat16):
        m.attn(x)
        q, k, _ = m.attn.qk(x)  # the bfloat16 q and k the call used
    ent, _, _ = layer_metrics(mon)
    mon.close()
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    ref = MF.attention_entropy(s.softmax(-1))
    assert torch.allclose(ent, ref["entropy"], rtol=1e-5)


@pytest.mark.parametrize("path", ["model", "model.layers.*.self_attn"])
def test_a_transformers_model_loaded_eager_is_refused_when_the_monitor_is_built(path):
    """Its attention is plain matmuls the probe cannot see: said at once, not at the first
    log; the same model with SDPA is accepted."""
    pytest.importorskip("transformers")
    eager = tiny("Llama", attn_implementation="eager")
    with pytest.raises(ValueError, match="'eager'.* load it with 'sdpa' or 'flex_attention'"):
        CollapseMonitor(eager, [probes.AttentionEntropy(path)], 2)
    CollapseMonitor(tiny("Llama"), [probes.AttentionEntropy(path)], 2).close()
    # Gemma 2 has no SDPA path in transformers: the message names what its class supports
    gemma = tiny("Gemma2", head_dim=8, attn_implementation="eager")
    if not getattr(gemma, "_supports_sdpa", True):
        with pytest.raises(ValueError, match="load it with 'flex_attention' \\(the"):
            CollapseMonitor(gemma, [probes.AttentionEntropy(path)], 2)


def test_an_eager_model_holding_a_multihead_attention_is_read_there():
    """SigLIP's vision tower loaded eager pools with an nn.MultiheadAttention, which the probe
    reads whatever the config says: accepted, and its heads logged."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=8,
        patch_size=4,
        attn_implementation="eager",
    )
    vision = transformers.SiglipVisionModel(cfg)
    mon = CollapseMonitor(vision, [probes.AttentionEntropy("head", name="pool")], 1)
    with mon.observe():
        vision(pixel_values=torch.randn(2, 3, 8, 8))
    logged = mon.step()
    mon.close()
    assert {f"collapse/pool/head.attention/entropy/head_{h}" for h in (0, 1)} <= set(logged)
