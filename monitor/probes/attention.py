"""Attention entropy probe (METRICS.md section 3) for SDPA calls, nn.MultiheadAttention,
nn.TransformerEncoderLayer, and explicit probabilities."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .. import _dist
from ..functional.attention import (
    causal_allowed,
    entropy_from_logits,
    entropy_from_probs,
    normalised,
)
from ..pictures import Picture
from ..rules import Rule
from ..stats import SumStatistic, to_device
from .base import Probe

_F64 = torch.float64
_MHA_ARGS = (
    "query",
    "key",
    "value",
    "key_padding_mask",
    "need_weights",
    "attn_mask",
    "average_attn_weights",
    "is_causal",
)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_ENCODER_ARGS = ("src", "src_mask", "src_key_padding_mask", "is_causal")


class HeadEntropy(SumStatistic):
    """Per-head sums for one attention layer: queries, raw and normalised entropy; max |logit|."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.heads = heads
        for name in ("queries", "entropy", "queries_norm", "entropy_norm"):
            self.add_state(name, (heads,), _F64)
        self.add_max_state("max_logit", ())


def _bind(names, args, kwargs) -> dict:
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    return bound


def _to_bhld(x: torch.Tensor) -> torch.Tensor:
    """``(..., L, d)`` to ``(B, H, L, d)`` (no head dimension: H = 1)."""
    if x.ndim == 2:
        return x[None, None]
    if x.ndim == 3:
        return x[:, None]
    return x.reshape(-1, x.shape[-3], x.shape[-2], x.shape[-1])


class _SDPAMode(TorchFunctionMode):
    def __init__(self, probe: AttentionEntropy) -> None:
        super().__init__()
        self.probe = probe

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (
            func is F.scaled_dot_product_attention
            and not self.probe._suppress
            and not self.probe.disabled
        ):
            self.probe.guarded(self.probe._observe_sdpa, args, kwargs)
        return func(*args, **kwargs)


class AttentionEntropy(Probe):
    """Per-layer, per-head attention entropy, entropic overload and attention-logit growth.

    Finds the attention computed inside the selected modules (a path or a glob, e.g.
    ``"blocks.*.attn"`` or ``"transformer"``):

    1. calls of ``torch.nn.functional.scaled_dot_product_attention`` (nanoGPT-style blocks,
       ``transformers`` models with the SDPA implementation), caught with a ``TorchFunctionMode``
       that is active only inside ``observe()``; causal, boolean and additive masks and GQA are
       honoured (additive values below half the dtype's minimum count as masked). The layer is the
       innermost module whose forward made the call;
    2. ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` (whose fast path skips Python):
       q and k are recomputed from the module's inputs and projection weights, with
       ``key_padding_mask``, ``attn_mask`` (their True = masked convention) and ``is_causal``;
    3. with ``extract(module, args, output) -> probs`` or ``(probs, allowed)``, explicit
       probabilities ``(B, H, Lq, Lk)`` of the selected modules (``causal=True`` if they are).

    The attention rows of ``queries`` random query positions per call (``None``: all) are recomputed
    in float32 from the q and k the model used; memory is ``B*H*queries*Lk``, never ``Lk^2``.

    Reports per layer ``<layer>/entropy/head_<h>`` (nats), ``<layer>/entropy_norm/head_<h>``
    (``H_i / log n_i`` over queries with ``n_i >= 2`` allowed keys), ``<layer>/entropy_norm`` (mean
    over heads), ``<layer>/entropy_norm_min``, ``<layer>/overload_fraction`` (heads with
    ``entropy_norm >= overload_threshold``) and ``<layer>/max_logit`` (max ``|s_ij|`` seen), and
    ``min_entropy_norm`` over layers.
    """

    def __init__(
        self,
        module: str,
        queries: int | None = 64,
        overload_threshold: float = 0.9,
        causal: bool = False,
        seed: int = 0,
        name: str | None = None,
        extract=None,
    ) -> None:
        super().__init__(module, name, extract)
        if queries is not None and queries < 1:
            raise ValueError(f"queries must be >= 1 or None, got {queries}")
        self.queries = queries
        self.overload_threshold = float(overload_threshold)
        self.causal = causal
        self.seed = seed
        # the generator and the function mode are made at attach (neither pickles: Lightning's
        # ddp_spawn sends callbacks, and their probes, to the worker processes)
        self._generator: torch.Generator | None = None
        self._last_norm: dict[str, torch.Tensor] = {}  # per layer, from the last compute()
        self._mode: _SDPAMode | None = None
        self._stack: list[str] = []  # module paths whose forward is running
        self._calls: dict[str, int] = {}  # SDPA calls per module in the current forward
        self._suppress = 0  # inside modules handled from their inputs
        self._observed_steps = 0
        self._ever_seen = False
        self._roots: list[str] = []

    def new_window(self) -> dict:
        return {}

    def default_rules(self) -> list[Rule]:
        prefix = f"collapse/{self.name}"
        return [
            Rule(
                f"{prefix}/*/entropy_norm",
                0.1,
                "below",
                patience=2,
                name=f"{self.name}/entropy_collapse",
                message="attention entropy collapse (Zhai et al.): consider SigmaReparam or a lower learning rate",
            ),
            Rule(
                f"{prefix}/*/overload_fraction",
                0.5,
                "above",
                patience=2,
                name=f"{self.name}/overload",
                message="entropic overload: most heads attend near-uniformly",
            ),
        ]

    # ----------------------------------------------------------------- wiring
    def attach(self, model: nn.Module, monitor) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)
        self._mode = _SDPAMode(self)
        self.monitor = monitor
        self.window = self.new_window()
        seen, skip = set(), set()
        found = self.resolve(model)
        self._roots = [f"'{p}' ({type(m).__name__})" for p, m in found]
        for _, root in found:
            for sub in root.modules():
                if isinstance(sub, nn.TransformerEncoderLayer):
                    skip.add(id(sub.self_attn))
        for path, root in found:
            if self.extract is not None:
                if id(root) not in seen:
                    seen.add(id(root))
                    self._handles.append(
                        root.register_forward_hook(self._extract_hook(path), with_kwargs=True)
                    )
                continue
            for sub_path, sub in root.named_modules(prefix=path):
                if id(sub) in seen or id(sub) in skip:
                    continue
                seen.add(id(sub))
                if isinstance(sub, (nn.MultiheadAttention, nn.TransformerEncoderLayer)):
                    self._handles.append(
                        sub.register_forward_pre_hook(self._input_hook(sub_path), with_kwargs=True)
                    )
                    self._handles.append(
                        sub.register_forward_hook(self._leave_handled, always_call=True)
                    )
                else:
                    self._handles.append(sub.register_forward_pre_hook(self._enter(sub_path)))
                    self._handles.append(sub.register_forward_hook(self._leave, always_call=True))

    def _enter(self, path):
        def hook(module, args):
            if not self.active:
                return
            if not self._stack:
                self._mode.__enter__()
            self._stack.append(path)

        return hook

    def _leave(self, module, args, output):
        if self._stack:
            path = self._stack.pop()
            self._calls.pop(path, None)
            if not self._stack:
                self._mode.__exit__(None, None, None)

    def _input_hook(self, path):
        def hook(module, args, kwargs):
            if self.monitor.records(self):
                self._suppress += 1  # also when disabled: the post-hook always decrements
                if not self.disabled:
                    if isinstance(module, nn.TransformerEncoderLayer):
                        self.guarded(self._observe_encoder_layer, path, module, args, kwargs)
                    else:
                        self.guarded(
                            self._observe_mha, path, module, _bind(_MHA_ARGS, args, kwargs)
                        )

        return hook

    def _leave_handled(self, module, args, output):
        if self._suppress:
            self._suppress -= 1

    def _extract_hook(self, path):
        def hook(module, args, kwargs, output):
            if self.active:
                self.guarded(self._observe_probs, path, module, args, output)

        return hook

    def detach(self) -> None:
        super().detach()
        while self._stack:
            self._leave(None, None, None)

    def observe(self, path, module, args, kwargs, output) -> None:  # hooks are custom
        raise NotImplementedError

    # ----------------------------------------------------------------- the three sources
    def _observe_sdpa(self, args, kwargs) -> None:
        a = _bind(_SDPA_ARGS, args, kwargs)
        path = self._stack[-1] if self._stack else self.module
        k = self._calls.get(path, 0)
        self._calls[path] = k + 1
        layer = path if k == 0 else f"{path}/sdpa_{k}"
        q, key = a["query"], a["key"]
        if not isinstance(q, torch.Tensor) or q.ndim < 2:
            raise self.error(
                layer, f"unexpected scaled_dot_product_attention query {type(q).__name__}"
            )
        with torch.no_grad():
            q, key = _to_bhld(q.detach()), _to_bhld(key.detach())
            scale = a.get("scale") or 1.0 / math.sqrt(q.shape[-1])
            mask = a.get("attn_mask")
            allowed = additive = None
            if isinstance(mask, torch.Tensor):
                mask = mask.detach()
                mask = mask if mask.ndim >= 2 else mask[None]
                if mask.dtype == torch.bool:
                    allowed = mask
                else:
                    additive = mask
            self._accumulate(layer, q, key, scale, bool(a.get("is_causal")), allowed, additive)

    def _observe_mha(self, path, mha: nn.MultiheadAttention, a: dict) -> None:
        if mha.bias_k is not None or mha.add_zero_attn:
            raise self.error(path, "add_bias_kv and add_zero_attn are not supported; pass extract=")
        query, key = a["query"], a["key"]
        if query.is_nested or key.is_nested:
            raise self.error(
                path,
                "nested-tensor inputs are not supported (TransformerEncoder(enable_nested_tensor=False))",
            )
        batched = query.ndim == 3
        if not batched:
            query, key = query[None], key[None]
        elif not mha.batch_first:
            query, key = query.transpose(0, 1), key.transpose(0, 1)
        E, H = mha.embed_dim, mha.num_heads
        if mha._qkv_same_embed_dim:
            wq, wk = mha.in_proj_weight[:E], mha.in_proj_weight[E : 2 * E]
        else:
            wq, wk = mha.q_proj_weight, mha.k_proj_weight
        bq = bk = None
        if mha.in_proj_bias is not None:
            bq, bk = mha.in_proj_bias[:E], mha.in_proj_bias[E : 2 * E]
        q = F.linear(query.detach(), wq.detach(), None if bq is None else bq.detach())
        k = F.linear(key.detach(), wk.detach(), None if bk is None else bk.detach())
        B, L, S = q.shape[0], q.shape[1], k.shape[1]
        q = q.view(B, L, H, E // H).transpose(1, 2)
        k = k.view(B, S, H, E // H).transpose(1, 2)
        allowed = additive = None

        def add(mask, shape):
            nonlocal allowed, additive
            mask = mask.detach().reshape(shape)
            if mask.dtype == torch.bool:
                allowed = ~mask if allowed is None else allowed & ~mask
            else:
                additive = mask if additive is None else additive + mask

        kpm = a.get("key_padding_mask")
        if kpm is not None:
            add(kpm, (B, 1, 1, S))
        attn_mask = a.get("attn_mask")
        if attn_mask is not None:
            add(attn_mask, (B, H, L, S) if attn_mask.ndim == 3 else (1, 1, L, S))
        causal = bool(a.get("is_causal")) and attn_mask is None
        self._accumulate(path, q, k, 1.0 / math.sqrt(E // H), causal, allowed, additive)

    def _observe_encoder_layer(self, path, layer: nn.TransformerEncoderLayer, args, kwargs) -> None:
        a = _bind(_ENCODER_ARGS, args, kwargs)
        src = a["src"]
        x = layer.norm1(src) if layer.norm_first else src
        self._observe_mha(
            path + ".self_attn",
            layer.self_attn,
            {
                "query": x,
                "key": x,
                "key_padding_mask": a.get("src_key_padding_mask"),
                "attn_mask": a.get("src_mask"),
                "is_causal": a.get("is_causal", False),
            },
        )

    def _observe_probs(self, path, module, args, output) -> None:
        got = self.extract(module, args, output)
        probs, allowed = got if isinstance(got, (tuple, list)) else (got, None)
        if not isinstance(probs, torch.Tensor) or probs.ndim != 4:
            raise self.error(
                path,
                f"extract must return probabilities (B, H, Lq, Lk), got "
                f"{tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__}",
            )
        if self.causal:
            c = causal_allowed(probs.shape[-2], probs.shape[-1], probs.device)
            allowed = c if allowed is None else allowed & c
        H, n = entropy_from_probs(probs.detach(), allowed)
        self._add(path, H, n, None)

    # ----------------------------------------------------------------- core
    def _sample(self, length: int, device) -> list[torch.Tensor]:
        """Query rows to recompute: a sorted random sample, or all rows in chunks of 256."""
        if self.queries is None or self.queries >= length:
            return list(torch.arange(length, device=device).split(256))
        idx = torch.randperm(length, generator=self._generator)[: self.queries].sort().values
        return [to_device(idx, device)]

    def _accumulate(self, layer, q, k, scale, causal, allowed, additive) -> None:
        """Entropy of sampled query rows of ``softmax(q k' * scale + mask)``; q ``(B, H, L, d)``."""
        H, L = q.shape[1], q.shape[2]
        if q.shape[0] == 0 or L == 0 or k.shape[2] == 0:  # an empty batch: nothing to add
            return
        if k.shape[1] != H:  # grouped-query attention: each key head serves H / Hk query heads
            k = k.repeat_interleave(H // k.shape[1], dim=1)
        kt = k.float().transpose(-1, -2)
        S = k.shape[2]
        for rows in self._sample(L, q.device):
            logits = (q[:, :, rows].float() @ kt) * scale
            ok = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=q.device)
            if causal:
                ok = ok & causal_allowed(L, S, q.device, rows)
            if allowed is not None:
                ok = ok & _rows(allowed, rows)
            if additive is not None:
                add = _rows(additive, rows).float()
                logits = logits + add
                ok = ok & (add > torch.finfo(add.dtype).min / 2)
            H_i, n = entropy_from_logits(logits, ok)
            max_logit = torch.where(ok.expand_as(logits), logits.abs(), 0.0).amax()
            self._add(layer, H_i, n, max_logit)

    def pictures(self) -> dict[str, Picture]:
        layers = self._last_norm
        if not layers:
            return {}
        heads = max(v.numel() for v in layers.values())
        grid = torch.full((len(layers), heads), float("nan"), dtype=_F64)
        for i, v in enumerate(layers.values()):
            grid[i, : v.numel()] = v.to(_F64).cpu()
        return {
            "entropy_heatmap": Picture(
                "heatmap",
                grid,
                "normalised attention entropy (0: one key, 1: uniform)",
                "head",
                "layer",
                reference=0.5,
                labels=list(layers),
            )
        }

    def end_step(self) -> None:
        self._observed_steps += 1

    def _add(self, layer, H_i, n, max_logit) -> None:
        self._ever_seen = True
        heads = H_i.shape[1]
        stats = self.window.get(layer)
        if stats is None:
            stats = self.window[layer] = HeadEntropy(heads).to(H_i.device)
        elif stats.heads != heads:
            raise self.error(layer, f"head count changed from {stats.heads} to {heads}")
        valid = (n >= 1).to(_F64)
        h, norm_ok = normalised(H_i.to(_F64), n)
        dims = [d for d in range(H_i.ndim) if d != 1]
        stats.queries += valid.sum(dims)
        stats.entropy += (H_i.to(_F64) * valid).sum(dims)
        stats.queries_norm += norm_ok.to(_F64).sum(dims)
        stats.entropy_norm += h.sum(dims)
        if max_logit is not None:
            torch.maximum(stats.max_logit, max_logit.to(_F64), out=stats.max_logit)

    # ----------------------------------------------------------------- readout
    def _synced(self, group=None, sync: bool = True) -> dict:
        window = self.window
        if not (sync and _dist.is_distributed(group)):
            return window
        names = sorted(set().union(*_all_gather_names(sorted(window), group)))
        heads = dict(_all_gather_heads({k: v.heads for k, v in window.items()}, group))
        out = {}
        for name in names:
            stat = window[name].clone() if name in window else HeadEntropy(heads[name])
            out[name] = stat.all_reduce(group)
        return out

    def compute(self, group=None) -> dict[str, float]:
        out: dict[str, float] = {}
        layer_means = []
        self._last_norm = {}
        for layer, st in sorted(self._synced(group).items()):
            ent = (st.entropy / st.queries).tolist()
            ent_norm = st.entropy_norm / st.queries_norm
            self._last_norm[layer] = ent_norm
            for h in range(st.heads):
                out[f"{layer}/entropy/head_{h}"] = ent[h]
                out[f"{layer}/entropy_norm/head_{h}"] = ent_norm[h].item()
            finite = ent_norm[torch.isfinite(ent_norm)]
            if finite.numel():
                out[f"{layer}/entropy_norm"] = finite.mean().item()
                out[f"{layer}/entropy_norm_min"] = finite.min().item()
                out[f"{layer}/overload_fraction"] = (
                    (finite >= self.overload_threshold).to(_F64).mean().item()
                )
                layer_means.append(out[f"{layer}/entropy_norm"])
            if torch.isfinite(st.max_logit):
                out[f"{layer}/max_logit"] = st.max_logit.item()
        if layer_means:
            out["min_entropy_norm"] = min(layer_means)
        if not out and self._observed_steps and not self._ever_seen:
            raise ValueError(
                f"AttentionEntropy '{self.name}': no attention was seen in {self._observed_steps} "
                f"observed steps inside {', '.join(self._roots)}: no scaled_dot_product_attention "
                "call, nn.MultiheadAttention or nn.TransformerEncoderLayer; select the attention "
                "modules or pass extract="
            )
        return out

    def state_dict(self, group=None, sync: bool = True) -> dict:
        return {
            "layers": {k: (v.heads, v.state_dict()) for k, v in self._synced(group, sync).items()},
            "generator": self._generator.get_state(),
            "observed_steps": self._observed_steps,
        }

    def load_state_dict(self, state: dict, keep_window: bool = True) -> None:
        self.window = {}
        for layer, (heads, sd) in state["layers"].items():
            st = HeadEntropy(heads)
            st.load_state_dict(sd)
            if not keep_window:
                st.reset()
            self.window[layer] = st
        self._generator.set_state(state["generator"])
        self._observed_steps = int(state["observed_steps"])
        self._ever_seen = self._ever_seen or bool(self.window)


def _rows(mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Select query rows (dimension -2) of a mask broadcastable to ``(B, H, L, S)``."""
    while mask.ndim < 4:
        mask = mask[None]
    return mask if mask.shape[-2] == 1 else mask[..., rows, :]


def _all_gather_names(names, group):
    import torch.distributed as dist

    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, names, group=group)
    return [set(n) for n in out]


def _all_gather_heads(heads: dict, group):
    import torch.distributed as dist

    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, heads, group=group)
    merged = {}
    for d in out:
        merged.update(d)
    return merged.items()
