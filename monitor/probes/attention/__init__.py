"""Attention entropy probe (docs/metrics.md#attentionentropy). The attention reaches the probe from one of
three sources, each an adapter in its own file (``sdpa.py``, ``mha.py``, ``encoder_layer.py``),
or as explicit probabilities through ``extract=``."""

from __future__ import annotations

import torch
from torch import nn

from ..._adapters import adapted_path
from ..._modules import named_modules
from ...contracts import Readout
from ...functional.attention import (
    attendable,
    causal_allowed,
    entropy_from_logits,
    entropy_from_probs,
    entropy_from_sums,
)
from ...pictures import Picture
from ...reading import Reading
from ...rules import RuleSpec
from ...stats import HeadEntropy, Window, to_device
from ..base import Probe, layer_name
from .encoder_layer import EncoderLayerInputs
from .mha import MultiheadAttentionInputs
from .scores import Probabilities, Scores
from .sdpa import SDPACalls

_F64 = torch.float64
_LEFT_OUT = (0, -1)  # a layer another rank of the tensor-parallel group counts


def _is_probabilities(value) -> bool:
    probs = value[0] if isinstance(value, (tuple, list)) and value else value
    return isinstance(probs, torch.Tensor) and probs.is_floating_point() and probs.ndim == 4


class AttentionEntropy(Probe):
    """Per-layer, per-head attention entropy, entropic overload and attention-logit growth.

    Finds the attention computed inside the selected modules (a path or a glob, e.g.
    ``"blocks.*.attn"`` or ``"transformer"``):

    1. calls of ``torch.nn.functional.scaled_dot_product_attention`` (nanoGPT-style blocks,
       ``transformers`` models with the SDPA implementation); causal, boolean and additive masks
       and GQA are honoured (an additive bias masks a key when it makes it negligible:
       :func:`~collapse_monitor.functional.attention.attendable`). The
       layer is the innermost module whose forward made the call;
    2. ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` (whose fast path skips Python):
       q and k are recomputed from the module's inputs and projection weights, with
       ``key_padding_mask``, ``attn_mask`` (their True = masked convention) and ``is_causal``;
    3. with ``extract(module, args, output) -> probs`` or ``(probs, allowed)``, explicit
       probabilities ``(B, H, Lq, Lk)`` of the selected modules (``causal=True`` if they are).

    The attention rows of ``queries`` random query positions per call (``None``: all) are recomputed
    in float32 from the q and k the model used; memory is ``B*H*queries*Lk``, never ``Lk^2``.

    Entropies average over real query rows only. Padded queries are known from the call where the
    module receives them (``key_padding_mask`` of a self-attention, ``src_key_padding_mask`` of an
    encoder layer, ``tgt_key_padding_mask`` of the ``nn.TransformerDecoderLayer`` around a
    cross-attention) or, for SDPA calls, from ``observe(mask=...)`` ``(B, L)`` (true for real
    tokens) or the model's own ``attention_mask`` input (``transformers``: left or right padding,
    right-aligned to the queries of a cached decoding step).

    Reports per layer ``<layer>/entropy/head_<h>`` (nats), ``<layer>/entropy_norm/head_<h>``
    (``H_i / log n_i`` over queries with ``n_i >= 2`` allowed keys), ``<layer>/entropy_norm`` (mean
    over heads), ``<layer>/entropy_norm_min``, ``<layer>/entropy_norm_last_step`` (the mean over
    heads on the last training step recorded in the window alone: the rule's latest value, a
    collapse inside the window), ``<layer>/overload_fraction`` (heads with
    ``entropy_norm >= overload_threshold``), ``<layer>/max_logit`` (max ``|s_ij|`` seen) and
    ``<layer>/skipped`` (query rows times heads left out: padding, no allowed key, NaN or Inf),
    and ``min_entropy_norm`` over layers
    (:func:`~collapse_monitor.functional.entropy_from_sums`).

    Raises:
        ValueError: at a log, when steps were observed but no attention was seen inside the
            selected modules; at the hook, when a layer's head count changes.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from collapse_monitor import CollapseMonitor, probes
        >>> layer = nn.TransformerEncoderLayer(16, 2, batch_first=True).eval()
        >>> model = nn.Sequential(layer)
        >>> mon = CollapseMonitor(model, [probes.AttentionEntropy("0", name="attn")], 1)
        >>> pad = torch.tensor([[False] * 5 + [True] * 3])  # 3 padded positions
        >>> with mon.observe(), torch.no_grad():
        ...     _ = model[0](torch.randn(1, 8, 16), src_key_padding_mask=pad)
        >>> m = mon.step()
        >>> m["collapse/attn/0.self_attn/skipped"]  # the padded queries, in each of 2 heads
        6.0
        >>> 0 < m["collapse/attn/0.self_attn/entropy_norm"] <= 1
        True
        >>> mon.close()
    """

    headline = ("entropy_norm",)

    reads = Reading(
        "attention probabilities (B, H, Lq, Lk), or (probs, allowed)",
        _is_probabilities,
        hint="probs",
    )
    keywords = {"mask": False}
    per_layer = True
    uses_token_mask = True
    rules = (
        RuleSpec(
            "*/entropy_norm",
            0.15,
            "below",
            name="entropy_collapse",
            severe=0.1,
            # a collapse inside the window: the window still averages the healthier steps, the
            # last step's rows alone show it (no healthy twin's last step crossed 0.15)
            latest="entropy_norm_last_step",
            latest_alone=True,
            message="attention entropy collapse (Zhai et al.): consider SigmaReparam or a lower "
            "learning rate",
        ),
    )
    # no default rule on overload_fraction: no run of the detection zoos ever showed it as a
    # failure, and an independent healthy encoder with QK-norm, whose second layer pools
    # near-uniformly (a counting task) after a brief dip, alarmed in 2 of 3 seeds at 600 steps;
    # whether near-uniform heads carry nothing depends on the task (the README's opt-in Rule)

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
        # made at attach: neither pickles (Lightning's ddp_spawn sends callbacks, and their
        # probes, to the worker processes)
        self._generator: torch.Generator | None = None
        self._sdpa: SDPACalls | None = None
        self._ever_seen = False
        self._steps = 0  # training steps recorded (to say when no attention was ever seen)
        self._roots = ""
        # under tensor parallelism: (size, coordinate) of the group and the modules whose
        # heads it shards (column-parallel q/k/v inside); made at attach
        self._tp: tuple[int, int] | None = None
        self._head_sharded: dict[int, set[int]] = {}
        self._below: set[int] = set()  # modules with column-parallel projections further down

    def new_window(self) -> Window:
        # per layer "<layer>": the window's sums; "<layer>/step" this step's, kept as
        # "<layer>/last" at the step's end (the rule's latest value)
        return Window(factory=lambda layer: HeadEntropy())

    # ----------------------------------------------------------------- wiring
    def on_attach(self, setup, found) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)
        self._roots = ", ".join(f"'{p}' ({type(m).__name__})" for p, m in found)
        subs = [sub for _, root in found for sub in root.modules()]
        eager = any(
            getattr(getattr(sub, "config", None), "_attn_implementation", None) == "eager"
            for sub in subs
        )
        # (an nn.MultiheadAttention or encoder layer inside, e.g. SigLIP's pooling head, is
        # read whatever the config says: then the eager attention is only left unseen)
        readable = any(
            MultiheadAttentionInputs.matches(sub) or EncoderLayerInputs.matches(sub) for sub in subs
        )
        self._shard_heads(setup.tensor_parallel, found)
        if eager and self.extract is None and not readable:  # (said now, not at the first log)
            # (the implementations the model's class declares: Gemma 2 has no SDPA path)
            model = next((m for m in setup.model.modules() if hasattr(m, "_supports_sdpa")), None)
            ways = [
                f"'{way}'"
                for way, flag in (
                    ("sdpa", "_supports_sdpa"),
                    ("flex_attention", "_supports_flex_attn"),
                )
                if getattr(model, flag, True)
            ]
            load = (
                f"load it with {' or '.join(ways)} (the entropies are the same), or "
                if ways
                else ""
            )
            raise ValueError(
                f"{self!r}: the transformers model in {self._roots} was loaded with "
                "attn_implementation='eager', which computes attention with plain matmuls the "
                f"probe does not see: {load}pass extract="
            )

    def _shard_heads(self, layout, found) -> None:
        """Under tensor parallelism, the modules whose heads the group may shard: those with
        a column-parallel (``Shard(0)``) ``nn.Linear`` child (q, k, v), with the children's
        whole row counts, and the modules inside them (an attention wrapper that makes the
        call, as torchtitan's ``sdpa``). A call of such a module whose local heads times head
        size times the group size is one of those counts (the query projection's) keys its
        heads by their global index (its coordinate times its head count, plus the local
        index), and the window reduces over every rank; a layer without column-parallel
        projections counts on the group's first rank only; one with them only further down
        (a block whose attention is inline beside a column-parallel MLP) is refused.
        """
        self._tp, self._head_sharded, self._below = None, {}, set()
        if layout is None:
            return

        def walk(path: str, module: nn.Module, inherited: set[int]) -> bool:
            named = [(f"{path}.{n}" if path else n, c) for n, c in module.named_children()]
            rows = {
                c.weight.shape[0]
                for p, c in named
                if isinstance(c, nn.Linear) and layout.sharded_dim(p) == 0
            }
            if rows or inherited:
                self._head_sharded[id(module)] = rows or inherited
            below = [walk(p, c, rows or inherited) for p, c in named]  # (every child)
            if any(below):
                self._below.add(id(module))
            return bool(rows) or any(below)

        for root_path, root in found:
            walk(root_path, root, set())
        self._tp = (layout.size, layout.coordinate)
        self.tp_sharded = bool(self._head_sharded)

    def attach_hooks(self, found, recorder) -> None:
        if self.extract is not None:
            super().attach_hooks(found, recorder)
            return
        self._sdpa = SDPACalls(recorder, self.module)
        sources = [
            EncoderLayerInputs(recorder, self._sdpa),
            MultiheadAttentionInputs(recorder, self._sdpa),
        ]
        seen, covered = set(), set()
        for _, root in found:
            for sub in root.modules():
                if EncoderLayerInputs.matches(sub):
                    covered.update(id(m) for m in EncoderLayerInputs.covers(sub))
        for root_path, root in found:
            named = named_modules(root, root_path)
            for path, sub in named.items():
                if id(sub) in seen or id(sub) in covered:
                    continue
                seen.add(id(sub))
                source = next((s for s in sources if s.matches(sub)), None)
                if source is None and type(sub).__module__.startswith("torch.nn.modules."):
                    # PyTorch's own layers (Linear, LayerNorm, Dropout, containers) never call
                    # SDPA or flex_attention: no hooks there, fewer calls on every forward
                    continue
                # a layer inside a PEFT adapter is keyed by the adapter's (the user's) path
                (source or self._sdpa).attach(adapted_path(path, named), sub, recorder.hooks)
        recorder.hooks.on_remove(self._sdpa.detach)

    # ----------------------------------------------------------------- hot path
    def update(self, window, value, call) -> None:
        layer = layer_name(call.path)
        shard = None
        if self.tp_sharded:  # under tensor parallelism: this rank's heads, or the first rank's
            rows = self._head_sharded.get(id(call.module))
            if rows is None and id(call.module) in self._below:
                raise call.error(
                    "under tensor parallelism its column-parallel projections lie further down "
                    "(an MLP's?), so whether its heads are split cannot be read: select the "
                    "attention modules themselves"
                )
            if rows is None:
                # (computed and left out: the sampled query rows stay those of the others)
                shard = _LEFT_OUT if self._tp[1] else None
            else:
                shard = self._tp
                if (
                    isinstance(value, Scores)
                    and value.q.shape[1] * value.q.shape[-1] * (self._tp[0]) not in rows
                ):
                    raise call.error(
                        f"its {value.q.shape[1]} local heads of size {value.q.shape[-1]} on "
                        f"each of {self._tp[0]} tensor-parallel ranks match none of its "
                        f"column-parallel projections (rows {sorted(rows)}): the global heads "
                        "cannot be numbered"
                    )
        if isinstance(value, Scores):
            self._add_scores(window, layer, value, shard)
            return
        if not isinstance(value, Probabilities):  # from extract: probs or (probs, allowed)
            value = (
                Probabilities(*value) if isinstance(value, (tuple, list)) else Probabilities(value)
            )
        allowed = value.allowed
        if self.causal:
            c = causal_allowed(value.probs.shape[-2], value.probs.shape[-1], value.probs.device)
            allowed = c if allowed is None else allowed & c
        H_i, n = entropy_from_probs(value.probs.detach(), allowed)
        self._add(window, layer, H_i, n, None, shard)

    def _sample(self, length: int, device) -> list[torch.Tensor]:
        """Query rows to recompute: a sorted random sample, or all rows in chunks of 256."""
        if self.queries is None or self.queries >= length:
            return list(torch.arange(length, device=device).split(256))
        idx = torch.randperm(length, generator=self._generator)[: self.queries].sort().values
        return [to_device(idx, device)]

    def _add_scores(self, window, layer: str, s: Scores, shard) -> None:
        """Entropy of sampled query rows of ``softmax(q k' * scale + mask)``."""
        q, k = s.q, s.k
        H, L = q.shape[1], q.shape[2]
        if q.shape[0] == 0 or L == 0 or k.shape[2] == 0:  # an empty batch: nothing to add
            return
        if k.shape[1] != H:  # grouped-query attention: each key head serves H / Hk query heads
            k = k.repeat_interleave(H // k.shape[1], dim=1)
        wide = _F64 if q.dtype == _F64 else torch.float32  # what the kernels accumulate in
        kt = k.to(wide).transpose(-1, -2)
        S = k.shape[2]
        for rows in self._sample(L, q.device):
            logits = (q[:, :, rows].to(wide) @ kt) * s.scale
            ok = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=q.device)
            if s.queries is not None:  # padded query rows: nothing there
                ok = ok & s.queries[:, rows].to(q.device)[:, None, :, None]
            if s.causal:
                ok = ok & causal_allowed(L, S, q.device, rows)
            if s.allowed is not None:
                ok = ok & _rows(s.allowed, rows)
            if s.additive is not None:  # a key whose bias leaves it negligible is masked
                add = _rows(s.additive, rows)
                ok = attendable(logits, add, ok)
                logits = logits + add.to(wide)
            scaled = logits  # max_logit: |q k' * scale| (a soft-cap would hide its growth)
            if s.flex is not None:  # FlexAttention: its mask, then its score modification
                ok = ok & s.flex.allowed(logits, rows)
                logits = s.flex.scores(logits, rows)
                ok = ok & ~torch.isneginf(logits)  # a score_mod that masks with -inf
            H_i, n = entropy_from_logits(logits, ok)
            max_logit = torch.where(ok.expand_as(scaled), scaled.abs(), 0.0).amax()
            self._add(window, layer, H_i, n, max_logit, shard)

    def _add(self, window, layer, H_i, n, max_logit, shard=None) -> None:
        self._ever_seen = True
        if shard is _LEFT_OUT:
            return
        stat = window[layer]
        real = n >= 1
        finite = torch.isfinite(H_i)
        # rows with no allowed key (padding) or a non-finite entropy are skipped, not counted
        skipped = (~(real & finite)).sum()
        n = torch.where(finite, n, 0)
        H_i = torch.where(finite, H_i, 0.0)
        if max_logit is not None:
            max_logit = torch.where(torch.isfinite(max_logit), max_logit, -float("inf"))
        sums = HeadEntropy.sums(H_i, n)  # (once, for the window and for the step)
        if shard is not None:  # this rank's heads among the group's: zeros for the others'
            size, coordinate = shard
            local = sums.shape[1]
            sums = torch.nn.functional.pad(
                sums, (coordinate * local, (size - 1 - coordinate) * local)
            )
        try:
            stat.add(sums, max_logit, skipped)
            window[f"{layer}/step"].add(sums)
        except ValueError as exc:  # a head count that changed: say which layer
            raise self.error(layer, str(exc)) from None

    # ----------------------------------------------------------------- readout
    def readout(self, window) -> Readout:
        metrics, norms, layer_means = {}, {}, []
        for layer, st in window.items():
            if not st.sizes["H"]:
                continue
            r = entropy_from_sums(
                st.queries, st.entropy, st.queries_norm, st.entropy_norm, self.overload_threshold
            )
            norms[layer] = r["entropy_norm"]
            for h, (e, en) in enumerate(zip(r["entropy"].tolist(), r["entropy_norm"].tolist())):
                metrics[self.key("entropy", layer, f"head_{h}")] = e
                metrics[self.key("entropy_norm", layer, f"head_{h}")] = en
            if r["entropy_norm_mean"] == r["entropy_norm_mean"]:  # defined (not NaN)
                metrics[self.key("entropy_norm", layer)] = r["entropy_norm_mean"]
                metrics[self.key("entropy_norm_min", layer)] = r["entropy_norm_min"]
                metrics[self.key("overload_fraction", layer)] = r["overload_fraction"]
                layer_means.append(r["entropy_norm_mean"])
            if torch.isfinite(st.max_logit):
                metrics[self.key("max_logit", layer)] = st.max_logit.item()
            metrics[self.key("skipped", layer)] = float(st.skipped)
            last = window[f"{layer}/last"] if f"{layer}/last" in window else None
            if last is not None and last.sizes["H"] and bool((last.queries_norm > 0).all()):
                norm = (last.entropy_norm / last.queries_norm).mean()
                metrics[self.key("entropy_norm_last_step", layer)] = norm.item()
        if layer_means:
            metrics[self.key("min_entropy_norm")] = min(layer_means)
        if not metrics and self._steps and not self._ever_seen:
            raise ValueError(
                f"AttentionEntropy '{self.name}': no attention was seen in {self._steps} "
                f"observed steps inside {self._roots}: no scaled_dot_product_attention "
                "call, nn.MultiheadAttention or nn.TransformerEncoderLayer; select the attention "
                "modules or pass extract= (a transformers model loaded with "
                "attn_implementation='eager' computes attention with plain matmuls: load it "
                "with 'sdpa' or 'flex_attention')"
            )
        return Readout(metrics, pictures=self._pictures(norms))

    def _pictures(self, layers: dict[str, torch.Tensor]) -> dict[str, Picture]:
        if not layers:
            return {}
        heads = max(v.numel() for v in layers.values())
        grid = torch.full((len(layers), heads), float("nan"), dtype=_F64)
        for i, v in enumerate(layers.values()):
            grid[i, : v.numel()] = v.to(_F64).cpu()
        return {
            self.key("entropy_heatmap"): Picture(
                "heatmap",
                grid,
                "normalised attention entropy (0: one key, 1: uniform)",
                "head",
                "layer",
                reference=0.5,
                labels=list(layers),
            )
        }

    # ----------------------------------------------------------------- persistence
    def end_step(self, window) -> None:
        self._steps += 1
        self._end_step(window, keep=True)

    def end_missed_step(self, window) -> None:
        self._end_step(window, keep=False)  # under DDP the other ranks' last step is this step

    def _end_step(self, window, keep: bool) -> None:
        for layer, _ in window.items():
            step, last = f"{layer}/step", f"{layer}/last"
            if keep and window[step].sizes["H"] is not None:
                window.shift(last, step)  # this step's sums are the last step's now
            else:
                window[last].reset()
                window[step].reset()

    def extra_state(self) -> dict:
        return {
            "generator": self._generator.get_state(),
            "steps": self._steps,
            "ever_seen": self._ever_seen,
        }

    def load_extra_state(self, state: dict) -> None:
        self._generator.set_state(state["generator"])
        self._steps = int(state["steps"])
        self._ever_seen = self._ever_seen or bool(state["ever_seen"])


def _rows(mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Select query rows (dimension -2) of a mask broadcastable to ``(B, H, L, S)``."""
    while mask.ndim < 4:
        mask = mask[None]
    return mask if mask.shape[-2] == 1 else mask[..., rows, :]


__all__ = ["AttentionEntropy"]
