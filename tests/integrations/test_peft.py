"""PEFT LoRA adapters: the user's module paths and keys through PEFT's wrappers, the map an
adapted layer applies (``W0 + scaling B A``) where a probe reads a weight, and mitigations that
refuse to rewrite part of an adapted layer."""

import copy

import pytest
import torch

from collapse_monitor import CollapseMonitor, mitigations, probes
from collapse_monitor import functional as F
from tests.probes.test_conventions import tiny

peft = pytest.importorskip("peft")

V = 40


def lora(targets, seed=1, **config):
    """A tiny Llama with LoRA on ``targets``; its B factors drawn (PEFT starts them at 0, an
    adapter that changes nothing)."""
    model = peft.get_peft_model(
        tiny("Llama", vocab_size=V, num_hidden_layers=1),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, **config),
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def applied(layer):
    """By hand: the weight a LoRA layer applies."""
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    return (layer.base_layer.weight + layer.scaling["default"] * delta).detach().double()


def test_paths_and_keys_are_the_users_through_peft_wrappers():
    # the same probes and paths on the model and on the model under PEFT (adapters at 0 change
    # nothing): the same keys and values
    ids = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(0))

    def metrics(model):
        watched = [
            probes.TokenEntropy("lm_head", tokens=None, name="entropy"),
            probes.AttentionEntropy("model.layers.0.self_attn", queries=None, name="attn"),
            probes.RepresentationRank("model.layers.0.self_attn.q_proj", name="q"),
        ]
        mon = CollapseMonitor(model, watched, 1, strict=True)
        with mon.observe(targets=ids), torch.no_grad():
            model(input_ids=ids)
        out = mon.step()
        mon.close()
        return out

    plain = metrics(tiny("Llama", vocab_size=V, num_hidden_layers=1))
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    wrapped = metrics(peft.get_peft_model(tiny("Llama", vocab_size=V, num_hidden_layers=1), config))
    assert sorted(plain) == sorted(wrapped)
    for key in plain:
        assert wrapped[key] == pytest.approx(plain[key], rel=1e-6, nan_ok=True), key
    # PEFT's own prefix names the same module, reported under the model's own path
    model = peft.get_peft_model(tiny("Llama", vocab_size=V, num_hidden_layers=1), config)
    probe = probes.TokenEntropy("base_model.model.lm_head", tokens=None, name="e")
    mon = CollapseMonitor(model, [probe], 1, strict=True)
    assert probe.paths == ["lm_head"]
    mon.close()
    # ... also for a PEFT model held by another module (a LightningModule's self.model)
    holder = torch.nn.Module()
    holder.model = model
    for path in ("model.base_model.model.lm_head", "model.lm_head"):
        probe = probes.TokenEntropy(path, tokens=None, name="e")
        mon = CollapseMonitor(holder, [probe], 1, strict=True)
        assert probe.paths == ["model.lm_head"]
        mon.close()


def test_token_entropys_hidden_state_path_applies_the_adapted_head():
    # TokenEntropy from the backbone's hidden states with head= a LoRA-adapted lm_head (never
    # made whole: its low-rank term added per chunk) equals the logits the model returns
    model = lora(["lm_head", "q_proj"])
    ids = torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(2))
    pair = [
        probes.TokenEntropy("lm_head", tokens=None, name="logits"),
        probes.TokenEntropy("model", head="lm_head", tokens=None, chunk=7, name="h"),
    ]
    mon = CollapseMonitor(model, pair, 1, strict=True)
    with mon.observe(targets=ids), torch.no_grad():
        logits = model(input_ids=ids).logits
    got = mon.step()
    mon.close()
    want = F.token_entropy_metrics(logits[:, :-1].double(), torch.ones(3, 8, dtype=torch.bool))
    assert got["collapse/h/entropy_mean"] == pytest.approx(want["entropy_mean"], rel=1e-5)
    assert got["collapse/logits/entropy_mean"] == pytest.approx(want["entropy_mean"], rel=1e-5)
    # and the adapter matters: the base weight alone gives another entropy
    h = model.base_model.model.model(input_ids=ids).last_hidden_state[:, :-1].detach().double()
    base = F.token_entropy(h @ model.base_model.model.lm_head.base_layer.weight.double().T)
    assert base.mean().item() != pytest.approx(want["entropy_mean"], rel=1e-3)


def test_neural_collapse_reads_the_weight_the_adapted_classifier_applies():
    # NC at an adapted lm_head's input: the classifier metrics use W0 + scaling B A (by hand)
    model = lora(["lm_head"])
    ids = torch.randint(0, V, (6, 10), generator=torch.Generator().manual_seed(3))
    nc = probes.NeuralCollapse("lm_head", V, ncc_max_rows=0, name="nc")
    mon = CollapseMonitor(model, [nc], 1, strict=True)
    with mon.observe(targets=ids), torch.no_grad():
        model(input_ids=ids)
    got = mon.step()
    mon.close()
    head = model.base_model.model.lm_head
    with torch.no_grad():
        h = model.base_model.model.model(input_ids=ids).last_hidden_state[:, :-1]
    want = F.neural_collapse(h.reshape(-1, 32).double(), ids[:, 1:].reshape(-1), V, applied(head))
    for key in ("self_duality", "equinorm_weights"):
        assert got[f"collapse/nc/{key}"] == pytest.approx(want[key], rel=1e-6), key


def test_adapters_whose_map_is_not_low_rank_and_rewrites_of_adapted_layers_are_refused():
    dora = lora(["lm_head"], use_dora=True)
    with pytest.raises(ValueError, match="use_dora"):
        CollapseMonitor(dora, [probes.TokenEntropy("model", head="lm_head")], 1)
    with pytest.raises(ValueError, match="use_dora"):
        CollapseMonitor(dora, [probes.NeuralCollapse("lm_head", V)], 1)
    model = lora(["q_proj", "up_proj"])
    with pytest.raises(ValueError, match="PEFT adapter layer 'model.layers.0.self_attn.q_proj'"):
        CollapseMonitor(model, [], 1, mitigations=[mitigations.SigmaReparam("model.layers.0")])
    redo = mitigations.ReDo(layers={"model.layers.0.mlp.act_fn": ("model.layers.0.mlp.up_proj",
                                                                 "model.layers.0.mlp.down_proj")})  # fmt: skip
    dormant = probes.DormantUnits("model.layers.0.mlp.act_fn")
    with pytest.raises(ValueError, match="PEFT adapter layer 'model.layers.0.mlp.up_proj'"):
        CollapseMonitor(model, [dormant], 1, mitigations=[redo])


def test_dormant_units_read_adapted_mlp_layers_as_their_base_layers():
    # LoRA on every linear layer of the MLP: the unit axis of the activation is still read
    # from the block's layers, and an adapted layer's (B, T, units) output as its base layer's
    # (no channel_dim); adapters at 0 give the plain model's numbers
    ids = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(4))

    def dormant(model):
        watched = [
            probes.DormantUnits(f"model.layers.0.mlp.{m}", name=m) for m in ("act_fn", "up_proj")
        ]
        mon = CollapseMonitor(model, watched, 1, strict=True)
        with mon.observe(), torch.no_grad():
            model(input_ids=ids)
        out = mon.step()
        mon.close()
        return out

    plain = dormant(tiny("Llama", vocab_size=V, num_hidden_layers=1))
    config = peft.LoraConfig(r=4, target_modules="all-linear")
    adapted = dormant(peft.get_peft_model(tiny("Llama", vocab_size=V, num_hidden_layers=1), config))
    assert "collapse/up_proj/model.layers.0.mlp.up_proj/mean_abs" in plain
    assert adapted == pytest.approx(plain, rel=1e-6)


def test_a_trained_copy_of_the_head_and_other_adapters_are_read_or_refused_never_dropped():
    # modules_to_save: the head is the trained copy PEFT runs; IA3 on the head is refused with
    # a message (its classifier metrics would otherwise vanish)
    model = peft.get_peft_model(
        tiny("Llama", vocab_size=V, num_hidden_layers=1),
        peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    )
    copy = model.base_model.model.lm_head.modules_to_save["default"]
    with torch.no_grad():
        copy.weight.mul_(3.0)  # the copy differs from the original
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(5))
    pair = [
        probes.TokenEntropy("lm_head", tokens=None, name="logits"),
        probes.TokenEntropy("model", head="lm_head", tokens=None, name="h"),
    ]
    mon = CollapseMonitor(model, pair, 1, strict=True)
    with mon.observe(targets=ids), torch.no_grad():
        model(input_ids=ids)
    got = mon.step()
    mon.close()
    assert got["collapse/h/entropy_mean"] == pytest.approx(
        got["collapse/logits/entropy_mean"], rel=1e-5
    )
    ia3 = peft.get_peft_model(
        tiny("Llama", vocab_size=V, num_hidden_layers=1),
        peft.IA3Config(target_modules=["lm_head"], feedforward_modules=[]),
    )
    with pytest.raises(ValueError, match="not read as they apply"):
        CollapseMonitor(ia3, [probes.NeuralCollapse("lm_head", V)], 1)


@pytest.mark.parametrize("inside", ["mha", "encoder_layer"])
def test_attention_through_a_lora_multihead_attention_is_the_adapted_attention(inside):
    """PEFT's LoRA ``nn.MultiheadAttention`` adds its delta to ``in_proj_weight`` only while its
    forward runs: the entropy is that of the merged weights, reported once under the user's path
    (not the base layer's, not the base weights'), also inside an ``nn.TransformerEncoderLayer``."""
    from torch import nn

    E, B, L = 16, 3, 6
    torch.manual_seed(0)
    if inside == "mha":
        layer = nn.MultiheadAttention(E, 2, batch_first=True)
        path, key = "attn", "attn"
    else:
        layer = nn.TransformerEncoderLayer(E, 2, 32, 0.0, batch_first=True)
        path, key = "attn", "attn.self_attn"

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.head = layer, nn.Linear(E, 3)

        def forward(self, x, kpm):
            if inside == "mha":
                x = self.attn(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
            else:
                x = self.attn(x, src_key_padding_mask=kpm)
            return self.head(x)

    target = ["attn"] if inside == "mha" else ["self_attn"]
    model = peft.get_peft_model(
        Net(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=target, init_lora_weights=False)
    )
    merged = copy.deepcopy(model).merge_and_unload()  # the map the adapted model applies
    mha = merged.attn if inside == "mha" else merged.attn.self_attn
    x = torch.randn(B, L, E)
    kpm = torch.arange(L)[None, :] >= torch.tensor([6, 4, 2])[:, None]
    mon = CollapseMonitor(
        model, [probes.AttentionEntropy(path, queries=None, name="a")], 1, strict=True
    )
    with mon.observe():
        model(x, kpm)
    got = mon.step()
    mon.close()
    layers = {k.split("/")[2] for k in got if "/entropy/head_" in k}
    assert layers == {key}
    with torch.no_grad():
        _, w = mha(x, x, x, key_padding_mask=kpm, average_attn_weights=False)
    ref = F.attention_entropy(w.double(), (~kpm)[:, None, None, :], queries=~kpm)["entropy"]
    for h in range(2):
        assert got[f"collapse/a/{key}/entropy/head_{h}"] == pytest.approx(float(ref[h]), rel=1e-5)
