"""Masks as real code writes them: finite additive biases (BERT's ``(1 - mask) * -10000.0``,
``-1e9``, ``finfo.min``), ``-inf`` and booleans all mask a key, in SDPA calls,
``nn.MultiheadAttention`` and ``transformers`` models; compared with a float64 reference that
drops the masked keys."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from collapse_monitor import CollapseMonitor, probes
from collapse_monitor import functional as MF
from tests.probes.test_attention_entropy import SDPAAttention, layer_metrics, watch

B, T = 3, 128


def real_keys(real: int = 2) -> torch.Tensor:
    """``(B, T)`` 1 for real tokens: the first sequence has ``real`` of them, the others more."""
    keep = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate((real, 50, T)):
        keep[b, :n] = 1
    return keep


def as_mask(keep: torch.Tensor, kind: str, dtype=torch.float32):
    """The ``(B, 1, 1, T)`` SDPA mask of ``keep`` in one of the conventions code uses."""
    pad = (1 - keep)[:, None, None, :].to(dtype)
    if kind == "bool":
        return keep.bool()[:, None, None, :]
    if kind == "-inf":
        return pad.masked_fill(pad > 0, -float("inf"))
    value = {"-1e4": -10000.0, "-1e9": -1e9, "finfo.min": torch.finfo(dtype).min}[kind]
    return pad * value


def reference(q, k, keep):
    """float64 entropies of softmax(q k'/sqrt(d)) over the real keys only."""
    q, k = q.double(), k.double()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    allowed = keep.bool()[:, None, None, :]
    s = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~allowed, -float("inf"))
    return MF.attention_entropy(torch.softmax(s, -1), allowed, queries=keep.bool())


@pytest.mark.parametrize("kind", ["-1e4", "-1e9", "finfo.min", "-inf", "bool"])
def test_uniform_attention_over_real_keys_is_uniform_and_raises_no_alert(kind):
    """Every query attends uniformly to the real keys (q = 0): entropy_norm is 1 whatever the
    mask convention, also with 2 real tokens of 128, and the default collapse rule is silent."""
    m = nn.Sequential()
    m.add_module("attn", SDPAAttention())
    nn.init.zeros_(m.attn.q.weight), nn.init.zeros_(m.attn.q.bias)
    keep = real_keys()
    mon = CollapseMonitor(m, [probes.AttentionEntropy("attn", name="attn")], 2)
    for _ in range(6):
        with mon.observe(mask=keep):
            m.attn(torch.randn(B, T, 32), mask=as_mask(keep, kind))
        logged = mon.step()
    norms = [v for k, v in logged.items() if "/entropy_norm/head_" in k]
    assert len(norms) == 4 and all(v == pytest.approx(1.0, abs=1e-6) for v in norms), logged
    assert not [k for k, v in logged.items() if k.startswith("collapse/alerts/") and v]
    mon.close()


@pytest.mark.parametrize("kind", ["-1e4", "-1e9", "finfo.min"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_finite_additive_masks_equal_a_reference_that_drops_the_keys(kind, dtype):
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("attn", SDPAAttention(kv_heads=2).to(dtype))
    x = torch.randn(B, T, 32, dtype=dtype)
    keep = real_keys(real=5)
    mon = watch(m)
    with mon.observe(mask=keep):
        m.attn(x, mask=as_mask(keep, kind, dtype))
    ent, norm, _ = layer_metrics(mon)
    q, k, _ = m.attn.qk(x)
    ref = reference(q, k, keep)
    tol = 1e-6 if dtype == torch.float64 else 1e-5
    assert torch.allclose(ent, ref["entropy"], rtol=tol)
    assert torch.allclose(norm, ref["entropy_norm"], rtol=tol)


def test_a_learned_bias_is_not_a_mask():
    """ALiBi-like finite biases (tens of nats) leave every key attendable."""
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("attn", SDPAAttention())
    x = torch.randn(2, 16, 32)
    pos = torch.arange(16.0)
    bias = -(pos[:, None] - pos[None, :]).abs()[None, None] * 2.0  # down to -30
    mon = watch(m)
    with mon.observe():
        m.attn(x, mask=bias)
    ent, norm, _ = layer_metrics(mon)
    q, k, _ = m.attn.qk(x)
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1]) + bias.double()
    ref = MF.attention_entropy(torch.softmax(s, -1))
    assert torch.allclose(ent, ref["entropy"], rtol=1e-5)
    assert torch.allclose(norm, ref["entropy_norm"], rtol=1e-5)


@pytest.mark.parametrize("kind", ["-1e4", "finfo.min"])
def test_multihead_attention_with_float_masks(kind):
    torch.manual_seed(0)
    E, L = 16, 12
    mha = nn.MultiheadAttention(E, 4, batch_first=True)
    m = nn.Sequential()
    m.add_module("attn", mha)
    keep = torch.ones(B, L, dtype=torch.long)
    keep[0, 3:] = 0
    value = -10000.0 if kind == "-1e4" else torch.finfo(torch.float32).min
    kpm = (1 - keep).float() * value
    causal = torch.triu(torch.full((L, L), value), 1)  # float causal mask of the same kind
    x = torch.randn(B, L, E)
    mon = watch(m)
    with mon.observe():
        mha(x, x, x, key_padding_mask=kpm, attn_mask=causal, need_weights=False)
    ent, norm, _ = layer_metrics(mon)
    allowed = keep.bool()[:, None, None, :] & torch.ones(L, L, dtype=torch.bool).tril()
    E_h = E // 4
    q = F.linear(x, mha.in_proj_weight[:E], mha.in_proj_bias[:E]).view(B, L, 4, E_h)
    k = F.linear(x, mha.in_proj_weight[E : 2 * E], mha.in_proj_bias[E : 2 * E]).view(B, L, 4, E_h)
    s = q.transpose(1, 2).double() @ k.transpose(1, 2).double().transpose(-1, -2) / math.sqrt(E_h)
    p = torch.softmax(s.masked_fill(~allowed, -float("inf")), -1)
    # self-attention: the padded keys are padded queries too
    ref = MF.attention_entropy(p.detach(), allowed, queries=keep.bool())
    assert torch.allclose(ent, ref["entropy"], rtol=1e-5)
    assert torch.allclose(norm, ref["entropy_norm"], rtol=1e-5)


def test_transformers_bert_with_padding_matches_eager_dropping_padded_keys():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_size=32,
        intermediate_size=64,
        vocab_size=64,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 20))
    keep = torch.ones(2, 20, dtype=torch.long)
    keep[0, 4:] = 0  # right padding
    mon = CollapseMonitor(
        model,
        [probes.AttentionEntropy("encoder.layer.*.attention.self", queries=None, name="attn")],
        10**6,
        observe_every_n_steps=1,
    )
    with mon.observe(), torch.no_grad():
        model(input_ids=ids, attention_mask=keep)
    got = mon.compute()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=keep, output_attentions=True).attentions
    allowed = keep.bool()[:, None, None, :]
    names = sorted({k.split("/")[2] for k in got if "/entropy/head_" in k})
    assert len(names) == 2
    for name, p in zip(names, eager):
        ref = MF.attention_entropy(p.double(), allowed, queries=keep.bool())
        norm = torch.tensor([got[f"collapse/attn/{name}/entropy_norm/head_{h}"] for h in range(4)])
        assert torch.allclose(norm.double(), ref["entropy_norm"], rtol=1e-5), name
