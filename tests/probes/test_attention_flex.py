"""FlexAttention (``torch.nn.attention.flex_attention``): the probe applies each call's
``score_mod`` and block mask to the sampled query rows. Every case is compared with a float64
reference written independently, with the masks and score modifications as dense tensors:
causal sliding windows, document masks (packed sequences), ALiBi-style biases, tanh soft-capping,
a score_mod that masks with ``-inf``, grouped-query heads, a block-sparse mask given by its
blocks alone, padded query rows, and query sampling. (FlexAttention has no backward on the CPU:
the forwards here run without gradients; tests/test_gpu.py trains through it.)"""

import math

import pytest
import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from collapse_monitor import CollapseMonitor, probes
from collapse_monitor import functional as MF
from tests.probes.test_attention_entropy import SDPAAttention, layer_metrics

B, T, WINDOW = 2, 32, 6
DOCS = torch.tensor([0] * 10 + [1] * 14 + [2] * 8)  # three packed documents
SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])


class FlexAttention(SDPAAttention):
    """The nanoGPT-style block of the SDPA tests, through flex_attention."""

    def __init__(self, score_mod=None, block_mask=None, kv_heads=None):
        super().__init__(kv_heads=kv_heads)
        self.score_mod, self.block_mask = score_mod, block_mask

    @torch.no_grad()  # (no backward on the CPU)
    def forward(self, x):
        q, k, v = self.qk(x)
        out = flex_attention(
            q, k, v, self.score_mod, self.block_mask, enable_gqa=self.kvh != self.h
        )
        return out.transpose(1, 2).flatten(2)


def sliding(b, h, q, kv):
    return (q >= kv) & (q - kv < WINDOW)


def document(b, h, q, kv):
    return (DOCS[q] == DOCS[kv]) & (q >= kv)


def alibi(score, b, h, q, kv):
    return score - SLOPES[h] * (q - kv)


def softcap(score, b, h, q, kv):
    return 5.0 * torch.tanh(score / 5.0)


def masked_by_score(score, b, h, q, kv):
    return torch.where(kv <= q, score, -float("inf"))


# the same, as dense (B, H, T, T) tensors for the reference
_q, _k = torch.arange(T)[:, None], torch.arange(T)[None, :]
DENSE_MASK = {
    "sliding": (_q >= _k) & (_q - _k < WINDOW),
    "document": (DOCS[:, None] == DOCS[None, :]) & (_q >= _k),
}
DENSE_SCORE = {
    "alibi": lambda s: s - SLOPES[None, :, None, None].double() * (_q - _k).double(),
    "softcap": lambda s: 5.0 * torch.tanh(s / 5.0),
    "masked_by_score": lambda s: s.masked_fill(_k > _q, -float("inf")),
}


def reference(q, k, allowed, score=None, queries=None):
    """float64 per-head entropies of softmax over the allowed keys of the modified scores."""
    q, k = q.double(), k.double()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = score(s) if score else s
    allowed = allowed & (s > -float("inf"))
    p = torch.softmax(s.masked_fill(~allowed, -float("inf")), -1).nan_to_num(0.0)
    return MF.attention_entropy(p, allowed, queries=queries)


CASES = {
    "sliding": ("sliding", None, None),
    "document": ("document", None, None),
    "alibi_causal": (None, "alibi", "causal"),
    "softcap_document": ("document", "softcap", None),
    "masked_by_score": (None, "masked_by_score", None),
    "gqa_sliding_alibi": ("sliding", "alibi", None),
}


def observed(score_mod, block, x, kv_heads=None, mask=None, **probe):
    """Per-head (entropy, entropy_norm) the probe logs for one call of a FlexAttention block
    on ``x`` (made after ``torch.manual_seed``), and the block's q and k."""
    m = nn.Sequential()
    m.add_module("attn", FlexAttention(score_mod, block, kv_heads=kv_heads))
    probe = {"queries": None, **probe}
    attn = probes.AttentionEntropy("attn", name="attn", **probe)
    mon = CollapseMonitor(m, [attn], 10**6, observe_every_n_steps=1)
    with mon.observe(**({} if mask is None else {"mask": mask})):
        m(x)
    ent, norm, _ = layer_metrics(mon)
    mon.close()
    q, k, _ = m.attn.qk(x)
    return ent, norm, q, k


def assert_equals(ent, want):
    torch.testing.assert_close(ent, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_flex_attention_equals_a_float64_reference(case):
    mask_name, score_name, extra = CASES[case]
    torch.manual_seed(0)
    mask_mod = {"sliding": sliding, "document": document, None: None}[mask_name]
    if extra == "causal":
        mask_mod = lambda b, h, q, kv: q >= kv  # noqa: E731
    block = create_block_mask(mask_mod, None, None, T, T, "cpu", BLOCK_SIZE=8) if mask_mod else None
    score_mod = {"alibi": alibi, "softcap": softcap, "masked_by_score": masked_by_score}.get(
        score_name
    )
    x = torch.randn(B, T, 32)
    ent, norm, q, k = observed(score_mod, block, x, kv_heads=2 if "gqa" in case else None)
    allowed = DENSE_MASK.get(mask_name, torch.ones(T, T, dtype=torch.bool))
    if extra == "causal":
        allowed = _q >= _k
    want = reference(q, k, allowed.expand(B, 4, T, T), DENSE_SCORE.get(score_name))
    assert_equals(ent, want["entropy"])
    assert_equals(norm, want["entropy_norm"])


def test_a_block_sparse_mask_given_by_its_blocks_alone():
    """``BlockMask.from_kv_blocks`` without a mask_mod: the blocks are the mask (the kernel
    attends whole blocks); each query block attends itself and the first block."""
    torch.manual_seed(1)
    n = T // 8
    kv_indices = torch.zeros(1, 1, n, n, dtype=torch.int32)  # (past a row's count: unused)
    kv_num = torch.ones(1, 1, n, dtype=torch.int32)
    for i in range(1, n):
        kv_indices[0, 0, i, 1] = i
        kv_num[0, 0, i] = 2
    block = BlockMask.from_kv_blocks(kv_num, kv_indices, BLOCK_SIZE=8, seq_lengths=(T, T))
    ent, _, q, k = observed(None, block, torch.randn(B, T, 32))
    qb, kb = _q // 8, _k // 8
    assert_equals(ent, reference(q, k, ((kb == 0) | (kb == qb)).expand(B, 4, T, T))["entropy"])


def test_padded_queries_and_sampled_rows():
    """``observe(mask=)`` leaves padded query rows out; with ``queries=8`` the probe's sample
    of rows gives the reference's entropy over the same rows."""
    block = create_block_mask(document, None, None, T, T, "cpu", BLOCK_SIZE=8)
    x = torch.randn(B, T, 32, generator=torch.Generator().manual_seed(2))
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[1, 20:] = False
    allowed = DENSE_MASK["document"].expand(B, 4, T, T)
    torch.manual_seed(2)
    ent, _, q, k = observed(alibi, block, x, mask=keep)
    assert_equals(ent, reference(q, k, allowed, DENSE_SCORE["alibi"], queries=keep)["entropy"])
    # sampled rows: the probe draws them from its generator (seeded), as here
    torch.manual_seed(2)
    ent, _, q, k = observed(alibi, block, x, queries=8, seed=3)
    rows = torch.randperm(T, generator=torch.Generator().manual_seed(3))[:8].sort().values
    queries = torch.zeros(B, T, dtype=torch.bool)
    queries[:, rows] = True
    assert_equals(ent, reference(q, k, allowed, DENSE_SCORE["alibi"], queries=queries)["entropy"])


def test_transformers_flex_attention_equals_its_sdpa_implementation():
    """A Llama with grouped-query heads, padded on both sides, run with
    ``attn_implementation="flex_attention"`` (its causal-and-padding BlockMask) logs the
    per-head entropies its SDPA implementation logs."""
    pytest.importorskip("transformers")
    from tests.probes.test_conventions import tiny

    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones(2, 16, dtype=torch.long)
    attention_mask[0, 12:] = 0  # right padding
    attention_mask[1, :5] = 0  # left padding
    logged = {}
    for impl in ("sdpa", "flex_attention"):
        model = tiny("Llama", num_hidden_layers=1)
        model.set_attn_implementation(impl)
        attn = probes.AttentionEntropy("model.layers.*.self_attn", queries=None, name="attn")
        mon = CollapseMonitor(model, [attn], 10**6, observe_every_n_steps=1)
        with torch.no_grad(), mon.observe():
            model(input_ids=ids, attention_mask=attention_mask)
        logged[impl] = {k: v for k, v in mon.compute().items() if "/entropy" in k}
        mon.close()
    assert len([k for k in logged["sdpa"] if "/head_" in k]) == 4 * 2  # heads x 2 metrics
    assert logged["flex_attention"].keys() == logged["sdpa"].keys()
    for k, v in logged["sdpa"].items():
        assert logged["flex_attention"][k] == pytest.approx(v, rel=1e-6, abs=1e-7), k
