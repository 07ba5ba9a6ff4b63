"""The conventions of the modules users have: vector-quantize-pytorch (placeholders, masks,
cosine and projected codebooks), ``transformers`` models built from configs (MoE routers,
padding on either side, grouped-query decoding, GPT-2's Conv1D), ``nn.Transformer*`` padding,
``torch.distributions`` event dimensions, convolutions in both layouts. Every expected value is
computed independently, from the definition."""

import copy
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Independent, Normal
from vector_quantize_pytorch import (
    FSQ,
    LFQ,
    GroupedResidualFSQ,
    GroupedResidualVQ,
    ResidualVQ,
    VectorQuantize,
)

from collapse_monitor import CollapseMonitor, mitigations, probes
from collapse_monitor import functional as MF


def run(model, probe_list, feed, steps=1, log_every=1, **kw):
    mon = CollapseMonitor(model, probe_list, log_every, strict=True, observe_every_n_steps=1, **kw)
    out = None
    try:
        for step in range(steps):
            observe = feed.get("observe", {}) if isinstance(feed, dict) else {}
            with mon.observe(**observe):
                (feed["forward"] if isinstance(feed, dict) else feed)(step)
            out = mon.step() or out
    finally:
        mon.close()
    return out


def usage_by_hand(indices: np.ndarray, K: int) -> tuple[float, float]:
    """(usage, perplexity) of the valid (>= 0) entries of one codebook."""
    valid = indices[indices >= 0]
    counts = np.bincount(valid, minlength=K).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return (counts > 0).mean(), math.exp(-(p * np.log(p)).sum())


# ------------------------------------------------------------------------- vector quantizers
@pytest.mark.parametrize("shared", [False, True])
def test_residual_vq_quantize_dropout_placeholders_are_skipped_not_errors(shared):
    torch.manual_seed(0)
    rvq = ResidualVQ(
        dim=8, num_quantizers=4, codebook_size=16, quantize_dropout=True, shared_codebook=shared
    ).train()
    model = nn.Module()
    model.rvq = rvq
    seen = []
    rvq.register_forward_hook(lambda m, a, o: seen.append(o[1].detach().clone()))
    probe = probes.CodebookUsage("rvq", 16, heads=4, name="rvq")
    mon = CollapseMonitor(model, [probe], 4, strict=True, observe_every_n_steps=1)
    for _ in range(4):
        with mon.observe():
            rvq(torch.randn(6, 10, 8))
        metrics = mon.step()
    idx = torch.cat(seen).reshape(-1, 4).numpy()
    assert (idx == -1).any(), "quantize dropout should have dropped some quantizers"
    assert metrics["collapse/rvq/skipped"] == (idx == -1).sum()
    for h in range(4):
        usage, perplexity = usage_by_hand(idx[:, h], 16)
        assert metrics[f"collapse/rvq/usage/head_{h}"] == pytest.approx(usage)
        assert metrics[f"collapse/rvq/perplexity/head_{h}"] == pytest.approx(perplexity, rel=1e-9)
        assert metrics[f"collapse/rvq/samples/head_{h}"] == (idx[:, h] >= 0).sum()
    mon.close()


def test_a_codebook_shared_by_residual_layers_is_reset_on_their_pooled_usage_only():
    """ResidualVQ(shared_codebook=True): a reset of one layer would call dead the codes only the
    other layer uses, and replace them (the docs' per-layer recipe did, 39 of 52 replacements on
    codes in use); it is refused, and one reset on the whole quantiser with a pooled probe
    replaces only codes no layer used."""
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=4, codebook_size=16, num_quantizers=2, shared_codebook=True).eval()
    model = nn.Module()
    model.q = rvq
    codebook = rvq.layers[0]._codebook.embed
    with torch.no_grad():
        codebook[0, :8] = torch.randn(8, 4) * 10  # coarse codes, layer 0's
        codebook[0, 8:] = torch.randn(8, 4) * 0.1  # fine codes, for layer 1's residuals
        codebook[0, 12:] = 50.0  # far away: no layer uses them
    per_layer = [probes.CodebookUsage(f"q.layers.{i}", 16, name=f"vq{i}") for i in range(2)]
    resets = [mitigations.ResetDeadCodes(f"q.layers.{i}", probe=f"vq{i}") for i in range(2)]
    with pytest.raises(ValueError, match=r"also used by \['q.layers.1._codebook'\]"):
        CollapseMonitor(model, per_layer, 4, mitigations=resets[:1])
    mon = CollapseMonitor(model, [probes.CodebookUsage("q", 16, name="vq")], 4,
                          mitigations=[mitigations.ResetDeadCodes("q", probe="vq")], strict=True)  # fmt: skip
    centres, used, replaced = codebook[0, :8].clone(), torch.zeros(16, dtype=torch.bool), 0
    for step in range(1, 9):
        with mon.observe():
            _, idx, _ = model.q(centres[torch.randint(8, (4, 16))] + 0.1 * torch.randn(4, 16, 4))
        used[idx.reshape(-1)] = True
        before = codebook.detach().clone()
        mon.step()
        changed = (codebook != before).any(-1)[0]
        assert not (changed & used).any(), f"step {step}: a code used in its window was replaced"
        replaced += int(changed.sum())
        if step % 4 == 0:  # a new window
            used[:] = False
    assert replaced >= 4  # the far codes, dead in every window
    mon.close()


@pytest.mark.parametrize("shared", [False, True])
def test_a_residual_quantiser_with_one_collapsed_layer_alerts(shared):
    """The first of 3 residual layers on 1 of its 16 codes, the others spread: the collapse
    measures are the worst codebook's, and the collapse rules fire at the first log (means
    over layers read about 0.4 and half the codes: nothing fired); layers on one shared
    codebook give their mean."""
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=4, codebook_size=16, num_quantizers=3, shared_codebook=shared).eval()
    if not shared:
        with torch.no_grad():
            rvq.layers[0]._codebook.embed[0, 1:] = 1e3  # every input is nearest to code 0
    model = nn.Module()
    model.rvq = rvq
    seen, alerts = [], []
    rvq.register_forward_hook(lambda m, a, o: seen.append(o[1].detach().clone()))
    probe = probes.CodebookUsage("rvq", 16, heads=3, name="rvq")
    mon = CollapseMonitor(model, [probe], 2, observe_every_n_steps=1, on_alert=alerts.append)
    for _ in range(2):
        with mon.observe():
            rvq(torch.randn(6, 10, 4))
        metrics = mon.step()
    mon.close()
    idx = torch.cat(seen).reshape(-1, 3).numpy()
    usages, perplexities = zip(*(usage_by_hand(idx[:, h], 16) for h in range(3)))
    ratios = np.array(perplexities) / 16
    want = np.mean(ratios) if shared else min(ratios)
    assert metrics["collapse/rvq/perplexity_ratio"] == pytest.approx(want, rel=1e-12)
    assert metrics["collapse/rvq/usage"] == pytest.approx(np.mean(usages), rel=1e-12)
    if not shared:
        assert usages[0] == 1 / 16 and min(usages[1:]) > 0.5
        assert metrics["collapse/rvq/codes_used_recent"] == 1
        # (the worst layer's usage ratio, 0.063, is a tenth of a uniform codebook's: one log)
        assert [a.rule for a in alerts] == ["rvq/usage_collapsed", "rvq/single_code"]


def test_a_quantiser_with_several_codebooks_must_be_read_per_codebook():
    """A ResidualVQ (or VectorQuantize with a codebook per head) returns one index into each of
    its codebooks: pooled as one codebook (the default heads=1) a user's check read 1.0 for
    0.84 / 0.97 / 1.00 apart. The probe reads the declared codebooks and refuses a mismatch;
    a shared codebook may be pooled."""
    model = nn.Module()
    model.rvq = ResidualVQ(dim=8, num_quantizers=3, codebook_size=16)
    with pytest.raises(ValueError, match=r"3 codebooks .* pass heads=3"):
        CollapseMonitor(model, [probes.CodebookUsage("rvq", 16)], 4)
    with pytest.raises(ValueError, match="num_codes=32, but the ResidualVQ's codebooks hold 16"):
        CollapseMonitor(model, [probes.CodebookUsage("rvq", 32, heads=3)], 4)
    CollapseMonitor(model, [probes.CodebookUsage("rvq", 16, heads=3)], 4).close()
    model.rvq = ResidualVQ(dim=8, num_quantizers=3, codebook_size=16, shared_codebook=True)
    CollapseMonitor(model, [probes.CodebookUsage("rvq", 16)], 4).close()
    model.rvq = VectorQuantize(dim=8, codebook_size=16, heads=2, separate_codebook_per_head=True)
    with pytest.raises(ValueError, match="pass heads=2"):
        CollapseMonitor(model, [probes.CodebookUsage("rvq", 16)], 4)
    model.rvq = VectorQuantize(dim=8, codebook_size=16, heads=2)  # one codebook for both heads
    CollapseMonitor(model, [probes.CodebookUsage("rvq", 16)], 4).close()
    model.rvq = FSQ(levels=[8, 5, 5], num_codebooks=2, dim=12)  # (..., 2) indices
    with pytest.raises(ValueError, match="pass heads=2"):
        CollapseMonitor(model, [probes.CodebookUsage("rvq", 200)], 4)
    CollapseMonitor(model, [probes.CodebookUsage("rvq", 200, heads=2)], 4).close()


@pytest.mark.parametrize(
    "grouped",
    [
        lambda: GroupedResidualVQ(dim=16, codebook_size=16, num_quantizers=1, groups=2),
        lambda: GroupedResidualFSQ(dim=16, levels=[4, 4], num_quantizers=1, groups=2),
    ],
)
def test_a_grouped_quantiser_is_refused_and_its_groups_read_apart(grouped):
    """vector-quantize-pytorch's grouped quantisers return ``(groups, ..., quantizers)``
    indices (its issue #111): pooled, two groups each on 4 of 16 codes read usage 0.5 and no
    alert; no ``heads=`` reads the leading groups. Refused; each group's quantiser, probed
    apart, reads its own usage (0.25 here, by hand)."""
    torch.manual_seed(0)
    model = nn.Module()
    model.q = grouped()
    with pytest.raises(ValueError, match=r"2 groups .*'q\.rvqs\.0'"):
        CollapseMonitor(model, [probes.CodebookUsage("q", 16)], 1)
    if isinstance(model.q, GroupedResidualVQ):
        with torch.no_grad():  # group g keeps codes 4g..4g+3 in reach: usage 0.25 each
            for g, rvq in enumerate(model.q.rvqs):
                embed = rvq.layers[0]._codebook.embed
                far = torch.ones(16, dtype=torch.bool)
                far[4 * g : 4 * g + 4] = False
                embed[:, far] = 1e3
    model.eval()
    seen = []
    model.q.register_forward_hook(lambda m, a, o: seen.append(o[1]))
    group_probes = [probes.CodebookUsage(f"q.rvqs.{g}", 16, name=f"g{g}") for g in range(2)]
    mon = CollapseMonitor(model, group_probes, 1)
    with mon.observe():
        model.q(torch.randn(8, 64, 16))
    metrics = mon.step()
    mon.close()
    for g in range(2):
        usage, perplexity = usage_by_hand(seen[-1][g].reshape(-1).numpy(), 16)
        assert metrics[f"collapse/g{g}/usage"] == pytest.approx(usage)
        assert metrics[f"collapse/g{g}/perplexity"] == pytest.approx(perplexity, rel=1e-9)
    if isinstance(model.q, GroupedResidualVQ):
        assert metrics["collapse/g0/usage"] == metrics["collapse/g1/usage"] == 0.25


class Masks(mitigations.Mitigation):
    """The masks a mitigation receives at each log."""

    def __init__(self):
        super().__init__("masks")
        self.seen = []

    def after_log(self, view):
        self.seen.append(view.readouts["rvq"].masks)
        return []


def test_a_quantizer_dropout_left_out_for_a_whole_window_shows_nothing():
    """A head with no index in the window is not a usage of 0 with every code dead (that read
    0.48 mean usage on a healthy ResidualVQ): its usage metrics are not logged, the means are
    over the heads the window saw, and no code of it goes to ResetDeadCodes as dead."""
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=8, num_quantizers=4, codebook_size=16, quantize_dropout=True).train()
    model = nn.Module()
    model.rvq = rvq
    seen = []
    rvq.register_forward_hook(lambda m, a, o: seen.append(o[1].detach().clone()))
    probe = probes.CodebookUsage("rvq", 16, heads=4, name="rvq", dead="window")
    masks = Masks()
    mon = CollapseMonitor(
        model, [probe], 2, strict=True, observe_every_n_steps=1, mitigations=[masks]
    )
    checked = 0
    for _ in range(40):
        with mon.observe():
            rvq(torch.randn(6, 10, 8))
        metrics = mon.step()
        if metrics is None:
            continue
        idx = torch.cat(seen).reshape(-1, 4).numpy()
        seen.clear()
        used = [(idx[:, h] >= 0).any() for h in range(4)]
        if all(used):
            continue
        checked += 1
        usages = [usage_by_hand(idx[:, h][idx[:, h] >= 0], 16)[0] for h in range(4) if used[h]]
        assert metrics["collapse/rvq/usage"] == pytest.approx(np.mean(usages))
        (mask,) = masks.seen[-1].values()
        for h in range(4):
            assert (f"collapse/rvq/usage/head_{h}" in metrics) == used[h]
            assert (f"collapse/rvq/dead_fraction/head_{h}" in metrics) == used[h]
            assert metrics[f"collapse/rvq/samples/head_{h}"] == (idx[:, h] >= 0).sum()
            if not used[h]:
                assert not mask[h].any()
    assert checked >= 3
    mon.close()


def test_vector_quantize_mask_positions_are_skipped():
    torch.manual_seed(0)
    vq = VectorQuantize(dim=8, codebook_size=32)
    model = nn.Module()
    model.vq = vq
    mask = torch.ones(4, 12, dtype=torch.bool)
    mask[0, 5:] = mask[2, 9:] = False
    x = torch.randn(4, 12, 8)
    got = run(model, [probes.CodebookUsage("vq", 32, name="vq")], lambda s: vq(x, mask=mask))
    idx = vq(x, mask=mask)[1].numpy()
    assert (idx[~mask.numpy()] == -1).all()
    assert got["collapse/vq/skipped"] == (~mask).sum() == 10
    assert got["collapse/vq/samples"] == mask.sum()


@pytest.mark.parametrize(
    "make", [lambda: FSQ(levels=[8, 5, 5], dim=6), lambda: LFQ(dim=4, codebook_size=16)]
)
def test_fsq_and_lfq_indices_are_read_by_default(make):
    torch.manual_seed(0)
    q = make()
    model = nn.Module()
    model.q = q
    K = 200 if isinstance(q, FSQ) else 16
    x = torch.randn(8, 20, 6 if isinstance(q, FSQ) else 4)
    got = run(model, [probes.CodebookUsage("q", K, name="q")], lambda s: q(x))
    out = q(x)
    idx = (out[1] if isinstance(q, FSQ) else out.indices).numpy()
    usage, perplexity = usage_by_hand(idx.reshape(-1), K)
    assert got["collapse/q/usage"] == pytest.approx(usage)
    assert got["collapse/q/perplexity"] == pytest.approx(perplexity, rel=1e-9)


@pytest.mark.parametrize("width", [3, 5])
def test_a_channel_first_residual_fsq_is_read_along_its_quantizer_axis(width):
    """``ResidualFSQ(is_channel_first=True)`` returns ``(B, quantizers, H, W)`` indices: read
    along the last axis, a map of width 3 (= the quantizers) mixed the three layers' codes (the
    first layer's 3 codes of 45 read 33, no alert), and one of width 5 switched the probe off."""
    from vector_quantize_pytorch import ResidualFSQ

    torch.manual_seed(0)
    model = nn.Module()
    model.q = ResidualFSQ(dim=16, levels=[5, 3, 3], num_quantizers=3, is_channel_first=True)
    x = torch.randn(1, 16, 1, 1) + 0.3 * torch.randn(8, 16, 6, width)  # layer 0: a few codes
    got = run(model, [probes.CodebookUsage("q", 45, heads=3, name="q")], lambda s: model.q(x))
    idx = model.q(x)[1].numpy()
    assert idx.shape == (8, 3, 6, width)
    for h in range(3):
        usage, perplexity = usage_by_hand(idx[:, h].reshape(-1), 45)
        assert got[f"collapse/q/usage/head_{h}"] == pytest.approx(usage)
        assert got[f"collapse/q/perplexity/head_{h}"] == pytest.approx(perplexity, rel=1e-9)
    assert got["collapse/q/usage/head_0"] < 0.25 < got["collapse/q/usage/head_2"]


def test_reset_dead_codes_on_a_cosine_codebook_gives_unit_codes_from_unmasked_rows():
    torch.manual_seed(0)
    vq = VectorQuantize(dim=8, codebook_size=64, use_cosine_sim=True, decay=0.8)
    model = nn.Module()
    model.vq = vq
    mask = torch.ones(8, 16, dtype=torch.bool)
    mask[:, 12:] = False
    direction = F.normalize(torch.randn(8), dim=0)
    x = 10 * F.normalize(direction + 0.05 * torch.randn(8, 16, 8), dim=-1)  # norm 10, one cluster
    x[~mask] = -1e3 * direction  # padding: must never become a code
    probe = probes.CodebookUsage("vq", 64, ema_decay=0.5, warmup_steps=1, name="vq")
    reset = mitigations.ResetDeadCodes("vq", every_step=False)
    mon = CollapseMonitor(
        model, [probe], 2, mitigations=[reset], strict=True, observe_every_n_steps=1
    )
    for _ in range(2):
        with mon.observe():
            vq(x, mask=mask)
        before = vq.codebook.detach().clone()  # the EMA moves codes: compare around the log
        metrics = mon.step()
    after = vq.codebook.detach()
    changed = (after - before).abs().amax(-1) > 1e-6
    assert metrics["collapse/mitigations/reset_dead_codes"] == changed.sum() > 10
    assert torch.allclose(
        after.norm(dim=-1), torch.ones(64), atol=1e-5
    )  # the codebook's convention
    cos_with_padding = after[changed] @ (-direction)
    assert (cos_with_padding < 0.5).all()  # none is the padding's direction
    assert (after[changed] @ direction > 0.8).all()  # all come from the real rows' cluster
    mon.close()


def test_reset_dead_codes_draws_in_the_projected_codebook_space():
    torch.manual_seed(0)
    vq = VectorQuantize(dim=16, codebook_dim=4, codebook_size=32, decay=0.8)
    model = nn.Module()
    model.vq = vq
    x = torch.randn(4, 16, 16) * 0.1 + 3.0
    probe = probes.CodebookUsage("vq", 32, ema_decay=0.5, warmup_steps=1, name="vq")
    mon = CollapseMonitor(
        model, [probe], 2, mitigations=[mitigations.ResetDeadCodes("vq", every_step=False)], strict=True,
        observe_every_n_steps=1,
    )  # fmt: skip
    for _ in range(2):
        with mon.observe():
            vq(x)
        before = vq.codebook.detach().clone()  # the EMA moves codes: compare around the log
        mon.step()
    after = vq.codebook.detach()
    changed = (after - before).abs().amax(-1) > 1e-6
    assert changed.sum() > 0 and after.shape[-1] == 4
    projected = vq.project_in(x).detach().reshape(-1, 4)
    for row in after[changed]:  # each new code is one projected input row, exactly
        assert (projected - row).abs().amax(-1).min() < 1e-5
    mon.close()


# ------------------------------------------------------------------------- transformers
def tiny(cls_name, **overrides):
    import transformers

    config_cls = getattr(transformers, cls_name + "Config")
    defaults = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    attn = overrides.pop("attn_implementation", "sdpa")
    cfg = config_cls(**{**defaults, **overrides})
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return getattr(transformers, cls_name + "ForCausalLM")(cfg).eval()


def tiny_bert():
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(cfg).eval()


def test_mixtral_routers_are_reported_per_layer_and_pooled_only_on_request():
    """The issue's case: each of 2 routers collapsed onto 2 of its 4 experts (layer 0 onto 0 and
    1, layer 1 onto 2 and 3): usage 0.5 and perplexity 2 per layer, while pooled they look
    healthy (usage 1, perplexity 4)."""
    model = tiny("Mixtral", num_local_experts=4, num_experts_per_tok=2)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            gate = layer.mlp.gate
            gate.weight.zero_()
            gate.weight[[0, 1] if i == 0 else [2, 3], 0] = 1.0
            # the router sees a constant input: its choice no longer depends on the token
            gate.register_forward_pre_hook(lambda m, a: (torch.ones_like(a[0]),))
    chosen = {i: [] for i in range(2)}
    for i, layer in enumerate(model.model.layers):
        layer.mlp.gate.register_forward_hook(
            lambda m, a, o, i=i: chosen[i].append(o[2].detach().clone())
        )
    ids = torch.randint(0, 64, (3, 10))
    per_layer = run(model, [probes.CodebookUsage("model.layers.*.mlp.gate", 4, name="router")],
                    lambda s: model(ids))  # fmt: skip
    by_layer = {i: torch.cat(chosen[i]).reshape(-1).numpy() for i in range(2)}
    for i in range(2):
        usage, perplexity = usage_by_hand(by_layer[i], 4)
        key = f"collapse/router/model.layers.{i}.mlp.gate"
        assert per_layer[f"{key}/usage"] == usage == 0.5
        assert per_layer[f"{key}/perplexity"] == pytest.approx(perplexity, rel=1e-9)
        assert perplexity == pytest.approx(2.0)
    assert "collapse/router/usage" not in per_layer  # nothing pooled unless asked
    for c in chosen.values():
        c.clear()
    pooled = run(model, [probes.CodebookUsage("model.layers.*.mlp.gate", 4, pool=True, name="router")],
                 lambda s: model(ids))  # fmt: skip
    both = np.concatenate([torch.cat(chosen[i]).reshape(-1).numpy() for i in range(2)])
    assert pooled["collapse/router/usage"] == usage_by_hand(both, 4)[0] == 1.0
    assert pooled["collapse/router/perplexity"] == pytest.approx(4.0)
    assert pooled["collapse/router/samples"] == 2 * 3 * 10 * 2  # layers x tokens x top-k


def eager_entropy(model, ids, mask, layer, causal=True):
    """Per-head mean entropy over real query rows from the eager attention probabilities."""
    set_attention(model, "eager")
    with torch.no_grad():
        probs = model(ids, attention_mask=mask, output_attentions=True).attentions[layer]
    set_attention(model, "sdpa")
    probs = probs.double()
    T = ids.shape[1]
    keys = torch.ones(T, T, dtype=torch.bool)
    allowed = (keys.tril() if causal else keys)[None, None] & mask.bool()[:, None, None, :]
    H, n = MF.entropy_from_probs(probs, allowed)  # (B, heads, T)
    real = mask.bool()[:, None, :].expand_as(H)
    return (H * real).sum((0, 2)) / real.sum((0, 2))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ["Llama", "Qwen2", "Bert"])
def test_padded_query_rows_are_left_out_of_attention_entropy(arch, side):
    model = tiny(arch) if arch != "Bert" else tiny_bert()
    ids = torch.randint(0, 64, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    pad = slice(0, 4) if side == "left" else slice(5, 9)
    mask[1, pad] = 0
    layers = "bert.encoder.layer" if arch == "Bert" else "model.layers"
    attn = "attention.self" if arch == "Bert" else "self_attn"
    got = run(model, [probes.AttentionEntropy(layers, queries=None, name="attn")],
              lambda s: model(ids, attention_mask=mask))  # fmt: skip
    for layer in range(2):
        want = eager_entropy(model, ids, mask, layer, causal=arch != "Bert")
        for h in range(4):
            key = f"collapse/attn/{layers}.{layer}.{attn}/entropy/head_{h}"
            assert got[key] == pytest.approx(want[h].item(), rel=1e-4), key
    assert got[f"collapse/attn/{layers}.0.{attn}/skipped"] == 4 * 4  # 4 rows x 4 heads


@pytest.mark.parametrize("arch", ["Mistral", "Qwen2"])
def test_grouped_query_decoding_with_left_padding_keeps_its_heads(arch):
    model = tiny(arch, sliding_window=16) if arch == "Mistral" else tiny(arch)
    ids = torch.randint(0, 64, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :6] = 0  # left padding
    mon = CollapseMonitor(
        model, [probes.AttentionEntropy("model.layers", name="attn")], 1, strict=True,
        observe_every_n_steps=1,
    )  # fmt: skip
    with mon.observe(), torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    metrics = mon.step()
    for layer in range(2):
        pre = f"collapse/attn/model.layers.{layer}.self_attn"
        heads = [k for k in metrics if k.startswith(pre + "/entropy/head_")]
        assert len(heads) == 4 and all(math.isfinite(metrics[k]) for k in heads)
    mon.close()


def set_attention(model, implementation):
    model.config._attn_implementation = implementation
    for mod in model.modules():
        if hasattr(mod, "config"):
            mod.config._attn_implementation = implementation


def test_a_packed_grouped_query_decoding_step_equals_eager_attention():
    """transformers packs a decoding step's query heads of one key-value head into query rows
    when a mask is present; unpacked, each head's entropy is the eager attention's."""
    model = tiny("Qwen2")
    ids = torch.randint(0, 64, (2, 12))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    step = torch.randint(0, 64, (2, 1))
    probs = {}
    for implementation in ("eager", "sdpa"):
        set_attention(model, implementation)
        with torch.no_grad():
            past = model(ids, attention_mask=mask[:, :12], use_cache=True).past_key_values
            if implementation == "eager":
                out = model(step, attention_mask=mask, past_key_values=past, output_attentions=True)
                probs = out.attentions
                continue
            mon = CollapseMonitor(
                model, [probes.AttentionEntropy("model.layers", queries=None, name="attn")], 1,
                strict=True, observe_every_n_steps=1,
            )  # fmt: skip
            with mon.observe():
                model(step, attention_mask=mask, past_key_values=past)
            got = mon.step()
            mon.close()
    allowed = mask.bool()[:, None, None, :]
    for layer in range(2):
        H, _ = MF.entropy_from_probs(probs[layer].double(), allowed)  # (B, 4 heads, 1)
        want = H.mean((0, 2))
        for h in range(4):
            key = f"collapse/attn/model.layers.{layer}.self_attn/entropy/head_{h}"
            assert got[key] == pytest.approx(want[h].item(), rel=1e-4), key


def test_sigma_reparam_on_gpt2_conv1d_projections_preserves_the_function():
    import transformers

    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    reparam = mitigations.SigmaReparam("transformer.h.*.attn")
    mon = CollapseMonitor(model, [], mitigations=[reparam], strict=True)
    assert sorted(reparam.applied) == sorted(
        f"transformer.h.{i}.attn.{p}:weight" for i in range(2) for p in ("c_attn", "c_proj")
    )
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(after, before, atol=1e-5)
    c_attn = model.transformer.h[0].attn.c_attn
    gamma = c_attn.parametrizations.weight[0].gamma
    assert torch.linalg.matrix_norm(c_attn.weight.detach(), 2) == pytest.approx(
        gamma.item(), rel=1e-4
    )
    mon.close()


# ------------------------------------------------------------------------- nn.Transformer*
def test_transformer_decoder_entropy_averages_over_real_target_tokens():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(16, 2, dim_feedforward=32, batch_first=True, dropout=0.0)
    model = nn.Module()
    model.dec = nn.TransformerDecoder(layer, 1).eval()
    tgt, memory = torch.randn(3, 7, 16), torch.randn(3, 5, 16)
    tgt_pad = torch.zeros(3, 7, dtype=torch.bool)
    tgt_pad[0, 4:] = tgt_pad[2, 6:] = True
    mem_pad = torch.zeros(3, 5, dtype=torch.bool)
    mem_pad[1, 3:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    kw = dict(tgt_mask=causal, tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=mem_pad)
    got = run(model, [probes.AttentionEntropy("dec", queries=None, name="attn")],
              lambda s: model.dec(tgt, memory, **kw))  # fmt: skip
    dec = model.dec.layers[0]
    with torch.no_grad():  # the reference: the layer's own attention probabilities (post-norm)
        _, self_p = dec.self_attn(tgt, tgt, tgt, attn_mask=causal, key_padding_mask=tgt_pad,
                                  need_weights=True, average_attn_weights=False)  # fmt: skip
        x = dec.norm1(tgt + dec.self_attn(tgt, tgt, tgt, attn_mask=causal,
                                          key_padding_mask=tgt_pad, need_weights=False)[0])  # fmt: skip
        _, cross_p = dec.multihead_attn(x, memory, memory, key_padding_mask=mem_pad,
                                        need_weights=True, average_attn_weights=False)  # fmt: skip
    real = ~tgt_pad
    self_allowed = (causal == 0)[None, None] & ~tgt_pad[:, None, None, :]
    cross_allowed = ~mem_pad[:, None, None, :].expand(3, 2, 7, 5)
    for name, p, allowed in (
        ("self_attn", self_p, self_allowed),
        ("multihead_attn", cross_p, cross_allowed),
    ):
        H, _ = MF.entropy_from_probs(p.double(), allowed)
        rows = real[:, None, :].expand_as(H)
        want = (H * rows).sum((0, 2)) / rows.sum((0, 2))
        all_rows = H.mean((0, 2))
        for h in range(2):
            key = f"collapse/attn/dec.layers.0.{name}/entropy/head_{h}"
            assert got[key] == pytest.approx(want[h].item(), rel=1e-5), key
        assert not torch.allclose(want, all_rows, rtol=1e-3)  # padding would have mattered


# ------------------------------------------------------------------------- posteriors
class ConvEncoder(nn.Module):
    """A (B, 4, 8, 8) Gaussian latent; channels 2 and 3 are the prior (collapsed)."""

    def __init__(self, kind="independent"):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        loc = torch.cat([x, torch.zeros_like(x)], 1)
        scale = torch.cat([0.5 * torch.ones_like(x), torch.ones_like(x)], 1)
        if self.kind == "independent":
            return Independent(Normal(loc, scale), 3)
        return loc, 2 * scale.log()


def test_independent_conv_posterior_counts_every_latent_dimension():
    torch.manual_seed(0)
    model = nn.Module()
    model.enc = ConvEncoder()
    x = torch.randn(64, 2, 8, 8)
    got = run(model, [probes.PosteriorCollapse("enc", name="vae")], lambda s: model.enc(x))
    # by hand: KL of N(mu, 0.25) to N(0, 1) per dimension, averaged over inputs, summed
    kl_live = 0.5 * (x.double().pow(2).mean(0) + 0.25 - math.log(0.25) - 1)
    assert got["collapse/vae/kl_total"] == pytest.approx(kl_live.sum().item(), rel=1e-6)
    assert got["collapse/vae/active_fraction"] == 0.5  # 128 of the 256 dimensions
    assert got["collapse/vae/active_units"] == 128


def test_a_posterior_whose_latent_axes_are_unknown_is_an_error_until_stated():
    model = nn.Module()
    model.enc = ConvEncoder(kind="tuple")
    x = torch.randn(16, 2, 8, 8)
    with pytest.raises(ValueError, match=r"mu of shape \(16, 4, 8, 8\).*pass latent_dims="):
        run(model, [probes.PosteriorCollapse("enc", name="vae")], lambda s: model.enc(x))
    got = run(model, [probes.PosteriorCollapse("enc", latent_dims=3, name="vae")],
              lambda s: model.enc(x))  # fmt: skip
    assert got["collapse/vae/active_units"] == 128


# ------------------------------------------------------------------------- unit layouts
class ChannelsLastBlock(nn.Module):
    """ConvNeXt's inverted bottleneck: (B, H, W, C) between the pointwise layers."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.norm = nn.LayerNorm(8)
        self.up = nn.Linear(8, 16)
        self.act = nn.GELU()
        self.down = nn.Linear(16, 8)

    def forward(self, x):
        h = self.norm(self.dw(x).permute(0, 2, 3, 1))
        return self.down(self.act(self.up(h))).permute(0, 3, 1, 2)


def test_dormant_units_take_the_unit_axis_from_the_layout_or_ask():
    torch.manual_seed(0)
    model = nn.Module()
    model.block = ChannelsLastBlock()
    model.cnn = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU())
    x = torch.randn(4, 8, 6, 6)
    with pytest.raises(ValueError, match=r"\(4, 6, 6, 16\).*pass channel_dim="):
        run(model, [probes.DormantUnits("block.act", name="d")], lambda s: model.block(x))
    got = run(model, [probes.DormantUnits("block.act", channel_dim=-1, name="d")],
              lambda s: model.block(x))  # fmt: skip
    a = model.block.act(model.block.up(model.block.norm(model.block.dw(x).permute(0, 2, 3, 1))))
    want = MF.dormant_units(a.detach(), channel_dim=-1)
    assert got["collapse/d/block.act/mean_abs"] == pytest.approx(want["mean_abs"], rel=1e-9)
    img = torch.randn(4, 3, 8, 8)
    for fmt in (torch.contiguous_format, torch.channels_last):  # memory format: same layout
        model.cnn.to(memory_format=fmt)
        got = run(model, [probes.DormantUnits("cnn.1", name="d")],
                  lambda s, fmt=fmt: model.cnn(img.to(memory_format=fmt)))  # fmt: skip
        want = MF.dormant_units(model.cnn(img).detach(), channel_dim=1)
        assert got["collapse/d/cnn.1/mean_abs"] == pytest.approx(want["mean_abs"], rel=1e-9)
    # a LayerNorm over a conv's (C, H, W) keeps its input's layout: channels first, not the
    # width (which ReDo took for the units: a mismatch at the log, or the wrong units)
    model.ln = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm([4, 6, 6]), nn.ReLU())
    with torch.no_grad():
        model.ln[1].bias[0] = -1e3  # channel 0 dead: one unit of 4 (none of the 6 columns)
    got = run(model, [probes.DormantUnits("ln.2", name="d")], lambda s: model.ln(img))
    want = MF.dormant_units(model.ln(img).detach(), channel_dim=1)
    assert got["collapse/d/ln.2/dormant_fraction"] == want["dormant_fraction"] == 0.25


# ------------------------------------------------------------------------- alignment, idle hooks
def test_probes_on_one_lm_head_align_unshifted_labels_alike():
    torch.manual_seed(0)
    head = nn.Linear(8, 5)
    model = nn.Module()
    model.head = head
    h = torch.randn(3, 6, 8)
    labels = torch.randint(0, 5, (3, 6))
    labels[0, 2] = -100
    got = run(
        model,
        [probes.NeuralCollapse("head", 5, target_shift=1, name="nc"),
         probes.LogitHealth("head", target_shift=1, nlm=False, name="logits")],
        {"forward": lambda s: head(h), "observe": {"targets": labels}},
    )  # fmt: skip
    logits, y = head(h)[:, :-1].detach(), labels[:, 1:]
    want = MF.logit_health(logits, y)
    assert got["collapse/logits/zero_loss_fraction"] == want["zero_loss_fraction"]
    assert got["collapse/logits/samples"] == 15
    ref = MF.neural_collapse(h[:, :-1][y != -100], y[y != -100], 5)
    assert got["collapse/nc/samples"] == 14
    assert got["collapse/nc/nc1"] == pytest.approx(ref["nc1"], rel=1e-6)


@pytest.mark.parametrize("arch", ["Llama", "GPT2"])
def test_a_causal_lm_shifts_its_labels_for_every_probe_on_its_head(arch):
    """transformers' causal LMs take unshifted labels (labels = input_ids) and shift them inside
    their loss: LogitHealth and NeuralCollapse on the head do the same with no argument, and
    agree with the model's own loss computed by hand."""
    pytest.importorskip("transformers")
    if arch == "GPT2":
        import transformers

        cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=12, n_positions=16)
        torch.manual_seed(0)
        model, head = transformers.GPT2LMHeadModel(cfg).eval(), "lm_head"
    else:
        model, head = tiny("Llama", vocab_size=12, num_hidden_layers=1), "lm_head"
    ids = torch.randint(0, 12, (4, 9))
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt left out of the loss
    feats = {}
    model.get_submodule(head).register_forward_pre_hook(lambda m, a: feats.update(h=a[0]))
    probes_ = [
        probes.NeuralCollapse(head, 12, ncc_max_rows=0, name="nc"),
        probes.LogitHealth(head, nlm=False, name="logits"),
    ]
    got = run(model, probes_, {"forward": lambda s: model(ids), "observe": {"targets": labels}})
    with torch.no_grad():
        out = model(ids, labels=labels)
    # by hand: position t's logits against the label at t + 1
    logits, y = out.logits[:, :-1].reshape(-1, 12), labels[:, 1:].reshape(-1)
    keep = y != -100
    loss = torch.nn.functional.cross_entropy(logits[keep].double(), y[keep])
    assert loss.item() == pytest.approx(out.loss.item(), rel=1e-5)  # the model's own alignment
    assert got["collapse/logits/samples"] == logits.shape[0]
    want = MF.logit_health(logits[keep], y[keep])
    assert got["collapse/logits/zero_loss_fraction"] == want["zero_loss_fraction"]
    h = feats["h"][:, :-1].reshape(-1, feats["h"].shape[-1])
    ref = MF.neural_collapse(h[keep].detach(), y[keep], 12)
    assert got["collapse/nc/samples"] == int(keep.sum())
    assert got["collapse/nc/nc1"] == pytest.approx(ref["nc1"], rel=1e-6)
    # told otherwise, one of them would pair the labels differently: refused
    probes_ = [
        probes.NeuralCollapse(head, 12, name="nc"),
        probes.LogitHealth(head, target_shift=0, name="logits"),
    ]
    with pytest.raises(ValueError, match="align their 'targets' labels differently.*'logits': 0"):
        CollapseMonitor(model, probes_, 1)


def test_every_causal_lm_of_the_installed_transformers_is_read_as_its_loss_shifts():
    """Re-reads each auto-mapped causal LM's forward (docstring left out): one that calls the
    shared loss function or slices its logits/labels shifts inside; one that passes its labels
    to a plain cross-entropy does not (Bart's and Whisper's decoders, XLNet, ...)."""
    import ast
    import inspect
    import textwrap

    transformers = pytest.importorskip("transformers")

    from collapse_monitor._modules import _UNSHIFTED_LMS, causal_lm_names

    checked = 0
    for name in sorted(causal_lm_names()):
        cls = getattr(transformers, name, None)
        if cls is None:
            continue
        fn = ast.parse(textwrap.dedent(inspect.getsource(cls.forward))).body[0]
        if isinstance(fn.body[0], ast.Expr) and isinstance(fn.body[0].value, ast.Constant):
            fn.body = fn.body[1:]
        code = ast.unparse(fn)
        shifts = any(s in code for s in ("loss_function", "shift_labels", "shift_logits", ":-1"))
        assert (name not in _UNSHIFTED_LMS) == shifts, name
        checked += 1
    assert checked > 250


def test_a_vision_language_lm_is_read_as_shifted():
    """Llava shifts its text labels inside its loss, as a causal LM (issue of a new-user run:
    NC1 0.045 unshifted against 444.9 shifted)."""
    pytest.importorskip("transformers")
    from collapse_monitor._modules import causal_lm, causal_lm_names

    assert "LlavaForConditionalGeneration" in causal_lm_names()
    import transformers

    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
            image_size=8, patch_size=4,
        ),
        text_config=transformers.LlamaConfig(
            vocab_size=40, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1,
        ),
        image_token_index=39,
    )  # fmt: skip
    model = transformers.LlavaForConditionalGeneration(cfg)
    assert causal_lm(model, "lm_head") == "LlavaForConditionalGeneration"


def test_a_decoder_whose_loss_does_not_shift_is_read_unshifted():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BartConfig(
        vocab_size=12, d_model=16, decoder_layers=1, decoder_attention_heads=2,
        decoder_ffn_dim=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=16,
        max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BartForCausalLM(cfg).eval()
    ids = torch.randint(0, 12, (2, 7))
    got = run(model, [probes.LogitHealth("lm_head", nlm=False, name="logits")],
              {"forward": lambda s: model(ids), "observe": {"targets": ids}})  # fmt: skip
    assert got["collapse/logits/samples"] == 14  # every position: Bart's loss pairs t with t


def test_groups_are_the_users_own_and_are_not_shifted_beside_shifted_labels():
    pytest.importorskip("transformers")
    model = tiny("Llama", vocab_size=12, num_hidden_layers=1)
    nc, gc = probes.NeuralCollapse("lm_head", 12, name="nc"), probes.GroupCollapse("lm_head", 3)
    CollapseMonitor(model, [nc, gc], 1).close()  # one module, different labels: both allowed
    assert (nc.label_shift, gc.label_shift) == (1, 0)


def test_logit_health_leaves_padded_positions_out():
    """A causal LM with left padding: the padded positions' logits are skipped (a new-user run
    found them counted in samples and softmax_collapse), aligned with the shifted labels."""
    pytest.importorskip("transformers")
    model = tiny("Llama", vocab_size=12, num_hidden_layers=1)
    ids = torch.randint(0, 12, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    mask[1, :2] = 0
    got = run(model, [probes.LogitHealth("lm_head", nlm=False, name="logits")],
              lambda s: model(ids, attention_mask=mask))  # fmt: skip
    real = mask[:, :-1].bool()  # the logits at t pair with the label at t + 1
    assert got["collapse/logits/samples"] == int(real.sum()) == 14
    assert got["collapse/logits/skipped"] == 21 - 14
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits[:, :-1][real]
    want = MF.logit_health(logits)
    assert got["collapse/logits/log_z_mean"] == pytest.approx(want["log_z_mean"], rel=1e-6)


def test_outside_a_causal_lm_labels_are_not_shifted():
    pytest.importorskip("transformers")
    model = tiny_bert()  # a masked LM: labels are per position
    ids = torch.randint(0, 64, (2, 7))
    got = run(model, [probes.LogitHealth("cls.predictions.decoder", nlm=False, name="logits")],
              {"forward": lambda s: model(ids), "observe": {"targets": ids}})  # fmt: skip
    assert got["collapse/logits/samples"] == 14


@pytest.mark.parametrize("every", [None, 1])
def test_a_model_compiled_before_attach_says_its_hooks_saw_nothing(every, caplog):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    compiled = torch.compile(model)
    compiled(torch.randn(2, 4))  # compiled before the monitor: later hooks are never called
    mon = CollapseMonitor(
        model, [probes.DormantUnits("1", name="d")], 4, observe_every_n_steps=every
    )
    logs = []
    with caplog.at_level(logging.WARNING, logger="collapse_monitor"):
        for _ in range(8):
            with mon.observe():
                compiled(torch.randn(2, 4))
            logs.append(mon.step())
    metrics = logs[-1]
    said = [r.message for r in caplog.records if "never ran inside observe()" in r.message]
    assert len(said) == 1 and "compiled before the monitor was attached" in said[0]
    assert metrics["collapse/d/calls"] == 0
    mon.close()


# ------------------------------------------------------------------------- from public reports
def test_a_grouped_query_prefill_as_long_as_the_group_is_not_unpacked():
    """transformers PR #39412 / #46960: with a mask, a prefill repeats the key heads; only a
    1-token decoding step packs its query. A 2-token prefill in a g=2 model must keep its heads."""
    model = tiny("Qwen2", num_hidden_layers=1)
    ids = torch.randint(0, 64, (3, 2))
    mask = torch.ones(3, 2, dtype=torch.long)
    mask[0, 0] = 0
    got = run(model, [probes.AttentionEntropy("model.layers", queries=None, name="attn")],
              lambda s: model(ids, attention_mask=mask))  # fmt: skip
    want = eager_entropy(model, ids, mask, 0)
    for h in range(4):
        key = f"collapse/attn/model.layers.0.self_attn/entropy/head_{h}"
        assert got[key] == pytest.approx(want[h].item(), rel=1e-4), key
    assert "collapse/attn/model.layers.0.self_attn/entropy/head_4" not in got


def tiny_switch(expert_capacity: int):
    """A 2+2-layer SwitchTransformers encoder-decoder of 8 experts, every layer sparse."""
    import transformers

    cfg = transformers.SwitchTransformersConfig(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=4, num_experts=8, encoder_sparse_step=1, decoder_sparse_step=1,
        expert_capacity=expert_capacity, decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.SwitchTransformersForConditionalGeneration(cfg).eval()


def test_a_switch_router_one_hot_assignment_is_read_as_experts():
    """transformers #48293 / PR #48421: SwitchTransformers' top-1 router returns a one-hot
    (B, T, E) int64; rows of zeros are tokens dropped by an expert's capacity."""
    model = tiny_switch(expert_capacity=2)
    path = next(n for n, m in model.named_modules() if type(m).__name__.endswith("Top1Router"))
    seen = []
    model.get_submodule(path).register_forward_hook(lambda m, a, o: seen.append(o[0].clone()))
    ids, dec = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 5))
    got = run(model, [probes.CodebookUsage(path, 8, name="router")],
              lambda s: model(input_ids=ids, decoder_input_ids=dec))  # fmt: skip
    hot = seen[0].reshape(-1, 8)
    routed = hot.sum(-1) > 0
    assert (~routed).any(), "the capacity should drop some tokens"
    usage, perplexity = usage_by_hand(hot.argmax(-1)[routed].numpy(), 8)
    assert got["collapse/router/usage"] == usage
    assert got["collapse/router/perplexity"] == pytest.approx(perplexity, rel=1e-9)
    assert got["collapse/router/samples"] == routed.sum()
    assert got["collapse/router/skipped"] == (~routed).sum()


def test_an_nllb_moe_router_one_hot_top_1_mask_is_read_as_experts():
    """NLLB-MoE's top-2 router returns its top-1 choice as a one-hot (tokens, experts) int64
    mask: read as indices, its 0s and 1s were experts 0 and 1 (usage 0.25 and an alert for 5
    of 8 experts, the same numbers on a router sent to one expert)."""
    import transformers

    cfg = transformers.NllbMoeConfig(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_experts=8,
        expert_capacity=64, encoder_sparse_step=1, decoder_sparse_step=1,
        max_position_embeddings=64, pad_token_id=1, router_dtype="float32",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.NllbMoeForConditionalGeneration(cfg).train()
    path = "model.encoder.layers.0.ffn.router"
    router = model.get_submodule(path)
    seen = []
    router.register_forward_hook(lambda m, a, o: seen.append(a[0].detach().double()))
    ids, labels = torch.randint(2, 64, (4, 12)), torch.randint(2, 64, (4, 12))
    got = run(model, [probes.CodebookUsage(path, 8, name="router")],
              lambda s: model(input_ids=ids, labels=labels))  # fmt: skip
    assert router.classifier.bias is None
    logits = seen[0] @ router.classifier.weight.double().T
    usage, perplexity = usage_by_hand(logits.argmax(-1).numpy(), 8)  # the top-1 experts
    assert got["collapse/router/samples"] == 48
    assert got["collapse/router/usage"] == usage >= 0.5  # (indices 0 and 1: 0.25)
    assert got["collapse/router/perplexity"] == pytest.approx(perplexity, rel=1e-9)


def test_a_routers_padded_tokens_are_skipped():
    """transformers #28505 / PR #28517: padded tokens are routed too (and were left out of the
    load-balancing loss); the monitor leaves them out of the experts' usage."""
    model = tiny("Mixtral", num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=1)
    seen = []
    model.model.layers[0].mlp.gate.register_forward_hook(lambda m, a, o: seen.append(o[2].clone()))
    ids = torch.randint(1, 64, (4, 12))
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[0, 3:] = mask[1, 5:] = mask[2, 8:] = 0
    got = run(model, [probes.CodebookUsage("model.layers.0.mlp.gate", 4, name="router")],
              lambda s: model(ids, attention_mask=mask))  # fmt: skip
    idx = seen[0].reshape(4, 12, 2)
    usage, perplexity = usage_by_hand(idx[mask.bool()].numpy(), 4)
    assert got["collapse/router/samples"] == 2 * mask.sum()
    assert got["collapse/router/skipped"] == 2 * (mask == 0).sum()
    assert got["collapse/router/perplexity"] == pytest.approx(perplexity, rel=1e-9)


class Wrapper(nn.Module):
    """A user's task model: ``forward(batch)`` calls the transformers model with the batch."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model(**batch).logits


def test_the_padding_of_a_model_inside_a_wrapper_a_lightning_module_or_merged_is_read():
    """A transformers model called from a user's wrapper or a LightningModule's training_step
    (its model's forward is never called), or a PEFT model's base model after
    merge_and_unload(): its own attention_mask is the padding (it was read only from the model
    given to the monitor, so every padded token counted)."""
    import lightning as L
    import peft

    class Module(L.LightningModule):  # forward(*args, **kwargs): Lightning's own, never called
        def __init__(self, model):
            super().__init__()
            self.model = model

        def training_step(self, batch, i):
            return self.model(**batch).logits

    ids = torch.randint(1, 64, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = mask[2, :9] = 0  # left padding
    batch = {"input_ids": ids * mask, "attention_mask": mask}
    model = tiny("Mixtral", num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=1)
    seen = []
    model.model.layers[0].mlp.gate.register_forward_hook(lambda m, a, o: seen.append(o[2].clone()))
    lora = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["q_proj"])
    )
    merged = lora.merge_and_unload()  # the model's own forward from now on
    runs = {
        "wrapper": (Wrapper(model), "model.", lambda root: root(batch)),
        "lightning": (Module(model), "model.", lambda root: root.training_step(batch, 0)),
        "merged": (lora, "", lambda root: merged(**batch).logits),
    }
    for name, (root, prefix, call) in runs.items():
        seen.clear()
        logits = []
        watched = [
            probes.CodebookUsage(prefix + "model.layers.0.mlp.gate", 4, name="router"),
            probes.TokenEntropy(prefix + "lm_head", tokens=None, name="tok"),
        ]
        got = run(root, watched, lambda s, c=call, r=root, out=logits: out.append(c(r).detach()))
        # by hand: the router's choices of real tokens; the entropy of each real position whose
        # next token is real (a causal LM's prediction)
        usage, perplexity = usage_by_hand(seen[0].reshape(3, 12, 2)[mask.bool()].numpy(), 4)
        assert got["collapse/router/samples"] == 2 * mask.sum(), name
        assert got["collapse/router/skipped"] == 2 * (mask == 0).sum(), name
        assert got["collapse/router/perplexity"] == pytest.approx(perplexity, rel=1e-9), name
        logp = logits[0].double().log_softmax(-1)[:, :-1]
        entropy = -(logp.exp() * logp).sum(-1)[(mask[:, :-1] * mask[:, 1:]).bool()]
        assert got["collapse/tok/tokens"] == entropy.numel(), name
        assert got["collapse/tok/entropy_mean"] == pytest.approx(entropy.mean().item(), rel=1e-6)


def test_a_vision_encoder_decoder_inside_a_wrapper_reads_its_decoders_padding_from_labels():
    """A VisionEncoderDecoderModel (Donut, TrOCR) called with labels alone, bare or inside a
    wrapper: its decoder's padding comes from the labels (a position after a -100 is padding),
    as when the decoder's mask is given; the decoder's own call (its mask None) must not replace
    it (it did once a wrapper made the monitor look inside the model: every position counted).
    Its labels pair with the decoder's positions unshifted (they were read shifted, as its GPT-2
    decoder's own loss would pair them)."""
    import transformers

    torch.manual_seed(0)
    vit = transformers.ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=16)  # fmt: skip
    gpt = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=16,
                                  add_cross_attention=True, is_decoder=True)  # fmt: skip
    ved = transformers.VisionEncoderDecoderModel(
        encoder=transformers.ViTModel(vit), decoder=transformers.GPT2LMHeadModel(gpt)
    ).eval()
    ved.config.decoder_start_token_id, ved.config.pad_token_id = 1, 0
    pixels, labels = torch.randn(2, 3, 8, 8), torch.randint(2, 32, (2, 5))
    labels[0, 3:] = -100
    decoder_ids = torch.cat([torch.ones(2, 1, dtype=torch.long), labels[:, :-1].clamp_min(0)], 1)
    decoder_mask = torch.ones_like(labels)
    decoder_mask[:, 1:] = labels[:, :-1] != -100
    wrapper = Wrapper(ved)
    wrapper.forward = lambda batch: ved(**batch)
    calls = {
        "labels": (ved, "", lambda: ved(pixel_values=pixels, labels=labels)),
        "wrapped": (wrapper, "model.", lambda: wrapper({"pixel_values": pixels, "labels": labels})),
        "mask given": (
            ved,
            "",
            lambda: ved(
                pixel_values=pixels,
                decoder_input_ids=decoder_ids,
                decoder_attention_mask=decoder_mask,
            ),
        ),  # fmt: skip
    }
    got = {}
    for name, (root, prefix, call) in calls.items():
        watched = [probes.TokenEntropy(prefix + "decoder.lm_head", tokens=None, name="t")]
        m = run(root, watched, lambda s, call=call: call())
        got[name] = (m["collapse/t/tokens"], m["collapse/t/entropy_mean"])
    assert got["labels"] == got["wrapped"] == got["mask given"]
    assert got["labels"][0] == decoder_mask.sum()  # the padding left out
    # its loss pairs the decoder's position t with the label at t (not t + 1, as its GPT-2
    # decoder's own loss would): every label that is not -100 is a sample, by hand
    logits = ved(pixel_values=pixels, labels=labels).logits.detach().double()
    real = labels != -100
    watched = [probes.TokenEntropy("decoder.lm_head", tokens=None, name="t")]
    m = run(ved, watched, {"forward": lambda s: ved(pixel_values=pixels, labels=labels),
                           "observe": {"targets": labels}})  # fmt: skip
    logp = logits.log_softmax(-1)[real].gather(-1, labels[real][:, None])
    assert m["collapse/t/tokens"] == real.sum()
    assert m["collapse/t/logprob_mean"] == pytest.approx(logp.mean().item(), rel=1e-6)


def test_a_routers_decoding_steps_read_the_masks_last_positions():
    """transformers #28505 with a key-value cache: a decoding step's (B*1, k) choices beside a
    (B, past + 1) mask that k divides (top-4 after 3 prompt tokens) paired each choice of one
    token with another position's padding, and a real token's choice was dropped. A step's
    tokens are the mask's last positions: here every decoded token is real."""
    model = tiny("Mixtral", num_local_experts=8, num_experts_per_tok=4, num_hidden_layers=1)
    seen = []
    model.model.layers[0].mlp.gate.register_forward_hook(lambda m, a, o: seen.append(o[2].clone()))
    ids = torch.randint(1, 64, (2, 3))
    mask = torch.ones(2, 3, dtype=torch.long)
    mask[0, 0] = 0  # left padding
    probe = probes.CodebookUsage("model.layers.0.mlp.gate", 8, name="router")
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    got = run(model, [probe], lambda s: model.generate(ids, attention_mask=mask, **kw))
    assert len(seen) == 3 and seen[0].shape == (6, 4) and seen[1].shape == (2, 4)
    real = [
        mask.reshape(-1).bool(),
        torch.ones(2, dtype=torch.bool),
        torch.ones(2, dtype=torch.bool),
    ]
    idx = torch.cat([s[r] for s, r in zip(seen, real)])
    usage, perplexity = usage_by_hand(idx.numpy(), 8)
    assert got["collapse/router/samples"] == idx.numel() == 4 * (5 + 2 + 2)
    assert got["collapse/router/skipped"] == 4 and got["collapse/router/usage"] == usage
    assert got["collapse/router/perplexity"] == pytest.approx(perplexity, rel=1e-9)


def test_an_encoder_decoders_decoder_reads_its_own_padding():
    """transformers #28505 / trl #6803: an encoder-decoder's attention_mask is its encoder's. A
    decoder router (or an LM head) as long as the encoder's input, or a multiple, took the
    encoder's padding for its own: 14 of 24 decoder tokens counted, no warning. Modules under
    the encoder read attention_mask; the others decoder_attention_mask (none: all real)."""
    model = tiny_switch(expert_capacity=64)  # (no token dropped)
    routers = [n for n, m in model.named_modules() if type(m).__name__.endswith("Top1Router")]
    enc = next(n for n in routers if n.startswith("encoder."))
    dec = next(n for n in routers if n.startswith("decoder."))
    seen = {}

    def keep(module, args, out):  # (the one-hot (B, T, E) choices of the step's one call)
        seen[names[module]] = out[0].argmax(-1)

    names = {model.get_submodule(p): p for p in (enc, dec)}
    for module in names:
        module.register_forward_hook(keep)
    ids, dec_ids = torch.randint(1, 64, (4, 6)), torch.randint(1, 64, (4, 6))
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[0, 4:] = mask[1, 2:] = 0
    decoder_mask = torch.ones(4, 6, dtype=torch.long)
    decoder_mask[2, 5:] = 0
    # labels padded with -100 and nothing else for the decoder (a seq2seq collator): the
    # decoder's input is the labels shifted right, padding after the label before it is -100
    labels = dec_ids.clone()
    labels[0, 3:] = labels[3, 5:] = -100
    from_labels = torch.ones(4, 6, dtype=torch.bool)
    from_labels[:, 1:] = labels[:, :-1] != -100
    for dmask, real_dec in (
        (None, torch.ones(4, 6, dtype=torch.bool)),
        (decoder_mask, decoder_mask.bool()),
        ("labels", from_labels),
    ):
        seen.clear()
        decoder = {"labels": labels} if dmask == "labels" else {
            "decoder_input_ids": dec_ids, "decoder_attention_mask": dmask
        }  # fmt: skip
        got = run(
            model,
            [probes.CodebookUsage(enc, 8, name="enc"), probes.CodebookUsage(dec, 8, name="dec")],
            lambda s, decoder=decoder: model(input_ids=ids, attention_mask=mask, **decoder),
        )
        real = {enc: mask.bool(), dec: real_dec}
        for name, path in (("enc", enc), ("dec", dec)):
            idx = seen[path][real[path]]
            usage, perplexity = usage_by_hand(idx.numpy(), 8)
            assert got[f"collapse/{name}/samples"] == real[path].sum(), (name, decoder)
            assert got[f"collapse/{name}/usage"] == usage
            assert got[f"collapse/{name}/perplexity"] == pytest.approx(perplexity, rel=1e-9)


def test_an_encoder_decoders_rollout_without_a_cache_counts_its_decoder_steps():
    """T5's generate(use_cache=False) calls the model with decoder_input_ids only: the call's
    length is the decoder's (a first version read a missing input_ids length and raised)."""
    import transformers

    cfg = transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
        num_heads=4, pad_token_id=0, decoder_start_token_id=0, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    ids = torch.randint(2, 64, (2, 5))
    probe = probes.TokenEntropy("lm_head", rollout=True, end_ids=(), name="te")
    mon = CollapseMonitor(model, [probe], 1, strict=True, observe_every_n_steps=1)
    for cache in (False, True):
        with mon.observe(rollout=True):
            out = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=cache)
        got = mon.step()
        assert got["collapse/te/tokens"] == 2 * (out.shape[1] - 1), cache  # (the start token)
    mon.close()


def test_a_bert_decoders_own_encoder_stack_is_on_the_decoder_side():
    """transformers' EncoderDecoderModel with a BERT decoder keeps the decoder's layers under
    ``decoder.bert.encoder``: the side is the first of ``encoder``/``decoder`` on the path, so
    those layers read decoder_attention_mask, not the encoder's attention_mask."""
    import transformers

    def bert(**kw):
        return transformers.BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=32, **kw,
        )  # fmt: skip

    cfg = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(
        bert(), bert(is_decoder=True, add_cross_attention=True)
    )
    cfg.decoder_start_token_id, cfg.pad_token_id = 1, 0
    torch.manual_seed(0)
    model = transformers.EncoderDecoderModel(config=cfg).eval()
    enc = "encoder.encoder.layer.0.output.dense"
    dec = "decoder.bert.encoder.layer.0.output.dense"
    ids, dec_ids = torch.randint(2, 64, (3, 6)), torch.randint(2, 64, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 2:] = mask[1, 4:] = 0
    dmask = torch.ones(3, 6, dtype=torch.long)
    dmask[2, 5:] = 0
    got = run(
        model,
        [probes.RepresentationRank(enc, name="enc"), probes.RepresentationRank(dec, name="dec")],
        lambda s: model(
            input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids,
            decoder_attention_mask=dmask,
        ),
    )  # fmt: skip
    assert got["collapse/enc/samples"] == mask.sum() == 12
    assert got["collapse/dec/samples"] == dmask.sum() == 17


def test_an_lfq_mask_leaves_padded_positions_out():
    """vector-quantize-pytorch #149 / #188: LFQ(x, mask=) does not write -1 at masked positions;
    the call's mask says which positions are real."""
    torch.manual_seed(0)
    q = LFQ(dim=4, codebook_size=16)
    model = nn.Module()
    model.q = q
    x = torch.randn(4, 12, 4)
    mask = torch.ones(4, 12, dtype=torch.bool)
    mask[0, 4:] = mask[1, 6:] = mask[2, 9:] = False
    x[~mask] = -1.0  # zero-padded features: one constant vector, one code
    got = run(model, [probes.CodebookUsage("q", 16, name="q")], lambda s: q(x, mask=mask))
    idx = q(x, mask=mask).indices
    assert (idx[~mask] >= 0).all()  # LFQ marks nothing
    usage, perplexity = usage_by_hand(idx[mask].numpy(), 16)
    assert got["collapse/q/samples"] == mask.sum() and got["collapse/q/skipped"] == (~mask).sum()
    assert got["collapse/q/perplexity"] == pytest.approx(perplexity, rel=1e-9)


def test_an_unflatten_before_the_activation_makes_channels_first():
    """pytorch #41516: Linear -> Unflatten -> ReLU -> ConvTranspose2d decoders (DCGAN, VAEs):
    the ReLU's output is (B, C, H, W) although the layer before the Unflatten is linear."""
    torch.manual_seed(0)
    C, S = 4, 3
    model = nn.Sequential(
        nn.Linear(8, C * S * S), nn.Unflatten(1, (C, S, S)), nn.ReLU(), nn.ConvTranspose2d(C, 2, 2)
    )  # fmt: skip
    with torch.no_grad():  # channel 0 is dead
        model[0].weight[: S * S] = 0.0
        model[0].bias[: S * S] = -9.0
    z = torch.randn(64, 8)
    with pytest.raises(ValueError, match="pass channel_dim="):
        run(model, [probes.DormantUnits("2", name="d")], lambda s: model(z))
    got = run(model, [probes.DormantUnits("2", channel_dim=1, name="d")], lambda s: model(z))
    want = MF.dormant_units(model[2](model[1](model[0](z))).detach(), channel_dim=1)
    assert got["collapse/d/2/dormant_fraction"] == want["dormant_fraction"] == 0.25


def test_a_models_attention_mask_given_by_position_is_the_padding():
    """transformers #7510: attention_mask is the second parameter so that it can be passed by
    position, model(ids, mask), as user code does."""
    model = tiny_bert()
    ids = torch.randint(0, 64, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    layers = "bert.encoder.layer"
    for call in (lambda: model(ids, attention_mask=mask), lambda: model(ids, mask)):
        got = run(model, [probes.AttentionEntropy(layers, queries=None, name="attn")],
                  lambda s, call=call: call())  # fmt: skip
        want = eager_entropy(model, ids, mask, 0, causal=False)
        key = f"collapse/attn/{layers}.0.attention.self"
        assert got[f"{key}/entropy/head_0"] == pytest.approx(want[0].item(), rel=1e-4)
        assert got[f"{key}/skipped"] == 4 * 4
