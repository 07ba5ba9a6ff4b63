"""Codebook collapse (docs/metrics.md#codebookusage): code usage of VQ layers, MoE routers, SAE latents."""

from __future__ import annotations

import logging

import torch

from .. import _dist
from ..cadence import EVERY_STEP
from ..contracts import Readout
from ..functional.codebook import dead_codes, fire_rate, usage_from_counts
from ..pictures import Picture
from ..reading import (
    Reading,
    finite_rows,
    floating,
    is_index,
    single_index_tensor,
    token_rows,
)
from ..rules import RuleSpec
from ..stats import CodeCounts, RecentHits, UsageEMA, Window, to_device
from .base import Probe

log = logging.getLogger(__name__)

_F64 = torch.float64
_NAN = float("nan")
# With a codebook per head, the values without an index (the rules') are the worst head's
# (True) where they measure a collapse: one collapsed codebook is a collapsed quantiser, which
# a mean hides (1 of 64 codes in the first of 3 residual layers read a mean usage of 0.62, the
# perplexity ratio of that layer 0.016). Usage itself stays the mean: a healthy residual
# quantiser's last layers use a third of their codes (0.32-0.36 held out), at the usage rule's
# line, while its ratios stay far from the collapse rules' tenth. usage_uniform: the thinnest
# head's, so a window is judged only where every head holds enough assignments. Likewise the
# latest steps: usage_recent the mean, codes_used_recent (a single code) the worst head's.
# transformers' routers whose integer output is a one-hot (tokens, experts) assignment (read as
# indices, its 0s and 1s counted experts 0 and 1: usage 2/8 for 5/8, the same on a collapse)
_ONE_HOT_ROUTERS = ("SwitchTransformersTop1Router", "NllbMoeTop2Router")
_OVER_HEADS = {"usage": False, "usage_uniform": True, "usage_ratio": True, "perplexity_ratio": True}
# usage_recent is the usage of the fewest latest steps whose assignments would show a uniform
# codebook 90% of its codes (T >= 2.3 K): a sample in which it is not low by construction, the
# same the window needs for the usage rule (a collapse at initialisation alerts at the first log)
_RECENT_UNIFORM = 0.9
_RECENT_STEPS = 128  # the most steps it reaches back (memory: 8 * H * 128 bytes)


class CodebookUsage(Probe):
    """Pooled code usage of a vector quantiser (or router, or any module emitting code indices).

    Indices are read from the module's output: an integer tensor, or the single integer tensor in
    a tuple/list/dict output (``vector_quantize_pytorch.VectorQuantize`` returns
    ``(quantized, indices, loss)``); ``extract(module, args, output)`` otherwise.

    Args:
        module: path of the quantiser module.
        num_codes: ``K``, codes per codebook.
        heads: ``H``; with ``H > 1`` the last dimension of the indices is the head and every
            head has its own counts, reported as ``.../head_<h>``; without an index, ``usage``
            and ``usage_recent`` are means over heads, and ``usage_uniform``, ``usage_ratio``,
            ``perplexity_ratio`` and ``codes_used_recent`` the lowest head's where each head has
            a codebook of its own: a collapsed codebook is a collapsed quantiser (their means
            for heads on one shared codebook, read from a vector-quantize-pytorch module's
            ``shared_codebook`` / ``separate_codebook_per_head``; pool the heads of your own
            quantiser on one codebook with ``heads=1``). With ``H = 1`` every
            index counts (e.g. the ``(tokens, k)`` top-k choices of an MoE router).
        ema_decay: decay ``d`` of the usage EMA, advanced once per observed training step.
        dead_threshold: a code is dead when its EMA usage, in hits per row (a row is one index
            per head), is below this; default ``0.01 / K`` (1% of a uniform share).
        warmup_steps: observed steps before the EMA decides (it starts at 0); before that a
            code is dead when the window holds no hit of it (as vector-quantize-pytorch calls
            codes dead from its first step), after it the EMA also protects codes used rarely
            but recently. Default ``ceil(1 / (1 - d))``. (The default rules on ``usage`` and
            ``perplexity_ratio`` have no warm-up: they judge every window that holds enough
            assignments, ``usage_uniform > 0.9``.)
        dead: ``"ema"`` (default) or ``"window"`` (dead = no hit in the whole window).
        ignore_index: the index that means "no code here": vector-quantize-pytorch writes ``-1``
            for quantizers dropped by ``ResidualVQ(quantize_dropout=True)`` and for positions a
            ``mask=`` leaves out. Such entries are counted in ``skipped``, never as a hit and never
            as an error (``None``: every index must be a code). Positions a ``mask=`` argument
            of the module's call leaves out (false), and padded tokens (``observe(mask=)``, or
            the model's ``attention_mask``: a router's padding), are skipped the same way.
        one_hot: the module returns one-hot assignments ``(..., K)`` (rows of zeros: no code,
            e.g. tokens dropped by an expert's capacity); default: only for ``transformers``'
            ``SwitchTransformersTop1Router`` and ``NllbMoeTop2Router`` (its top-1 mask; the
            second expert of its top-2 routing is in its router probabilities, for
            ``extract=``).
        pool: see :class:`~collapse_monitor.probes.Probe` (a glob over the routers of every MoE
            layer reports each layer apart unless ``pool=True``).

    Reports ``perplexity`` (``exp`` of the entropy of the pooled window counts, in ``[1, K]``),
    ``perplexity_ratio`` (``perplexity / K``), ``usage`` (fraction of codes hit in the window),
    ``usage_uniform`` (the usage a uniform codebook would show with the window's assignments,
    ``1 - (1 - 1/K)^T`` for ``T`` of them: a window is too thin to judge usage while this is
    low), ``usage_ratio`` (``usage / usage_uniform``), ``dead_codes``, ``dead_fraction``,
    ``samples`` (hits in the window), ``skipped``
    (placeholder entries) and ``out_of_range`` (indices outside ``[0, K)``, left out),
    ``usage_recent`` (the usage of the latest training steps alone: the fewest
    latest steps, up to 128 and across logs, whose indices would show a uniform codebook 90%
    of its codes, ``T >= 2.3 K`` per head, so that it is not low by construction; their number
    is ``usage_recent_steps``; not reported before that many indices were seen: the usage
    rule's latest value) and ``codes_used_recent`` (the codes hit in those steps: 1 is total
    collapse at any ``K``, the ``single_code`` rule), plus a histogram
    ``usage_hist`` of hits per code and the mask ``dead`` ``(H, K)`` for mitigations.
    Hot path: one ``index_add_`` per call, no host sync (out-of-range indices are left out and
    counted; a ``strict`` monitor raises at the call).
    State: ``32*H*K + 1024*H + O(H)`` bytes; under DDP the EMA is summed over ranks (it is linear
    in the counts), and a resumed run's ranks other than 0 start it at zero.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from collapse_monitor import CollapseMonitor, probes
        >>> model = nn.Sequential(nn.Identity())  # stands for a quantiser returning indices
        >>> mon = CollapseMonitor(model, [probes.CodebookUsage("0", 8, name="vq")], 1)
        >>> with mon.observe():
        ...     _ = model(torch.tensor([0, 1, 1, -1]))  # -1: no code here (masked)
        >>> m = mon.step()
        >>> m["collapse/vq/usage"], m["collapse/vq/samples"], m["collapse/vq/skipped"]
        (0.25, 3.0, 1.0)
        >>> mon.close()
    """

    headline = ("usage",)
    bad_input = ("out_of_range",)

    reads = Reading(
        "a single integer tensor of code indices",
        is_index,
        find=single_index_tensor,
        hint="indices",
    )
    sampling = EVERY_STEP  # O(B*D) per update
    keywords = {"mask": False}
    described = ("num_codes", "heads")
    uses_token_mask = True
    unit = "codes"
    rules = (
        # judged from the first log on, wherever the window holds enough assignments that a
        # healthy (uniform) codebook would show nearly all its codes: usage_uniform > 0.9, i.e.
        # T >= 2.3 K (a collapse at initialisation, the classic failure, alerts at once)
        # 0.35: healthy routers sit at half their experts for many logs (one dipped to 5 of 12,
        # a 20-expert one to 7 of 20), and a healthy 1024-code codebook climbing from its
        # initial 12% read 0.38 at its first log (0.43 held out: a window's usage is lower than
        # a larger sample's); severe 0.3 fires at once on the window or on the latest steps, a
        # sample of their own, so that a router of 8 experts on 2 inside its first window
        # alerts at that log; above 0.3 the latest steps are not trusted alone (a healthy
        # codebook's first steps dip to 0.33-0.5 as its dead codes are replaced). Known limit:
        # one 128-token step of a healthy but unbalanced router of 20 experts read 0.25
        # (detection.py, seventh round)
        RuleSpec(
            "usage",
            0.35,
            "below",
            name="usage_below",
            severe=0.3,
            # dead_codes: logged only by this class (collapse-monitor report replays rules by
            # metric name, and LatentUsage logs usage too)
            requires=(("usage_uniform", "above", 0.9), ("dead_codes", "above", -1.0)),
            # the latest steps' usage (a collapse inside the window: the window's usage still
            # holds the healthy steps before it)
            latest="usage_recent",
            message="under 35% of the codes are used: for a quantiser consider ResetDeadCodes "
            "or SimVQ; for an MoE router, a load-balancing loss",
        ),
        # a window too thin for the usage rule can still show a total collapse: a tenth of the
        # codes a uniform codebook would show there (one code of 512 in 1,200 assignments)
        RuleSpec(
            "usage_ratio",
            0.1,
            "below",
            name="usage_collapsed",
            # one log: a codebook collapsed at initialisation whose windows stay too thin for
            # usage_below (4096 codes fed 512 vectors a step) was seen one log late at two
            patience=1,
            requires=(("usage_uniform", "above", 0.5), ("dead_codes", "above", -1.0)),
            message="a tenth of the codes a uniform codebook would use in this window: collapsed",
        ),
        # every recent assignment on one code is total collapse at any K (with K = 2 or 3
        # experts, one expert is usage 0.5 or 0.33, never past usage_below's severe 0.3)
        RuleSpec(
            "codes_used_recent",
            1.5,
            "below",
            name="single_code",
            patience=1,
            message="every recent assignment went to a single code: the codebook or router "
            "has collapsed",
        ),
        RuleSpec(
            "perplexity_ratio",
            0.1,
            "below",
            name="perplexity_below",
            severe=0.02,
            requires=(("usage_uniform", "above", 0.9), ("dead_codes", "above", -1.0)),
        ),
    )

    def __init__(
        self,
        module: str,
        num_codes: int,
        heads: int = 1,
        ema_decay: float = 0.99,
        dead_threshold: float | None = None,
        warmup_steps: int | None = None,
        dead: str = "ema",
        ignore_index: int | None = -1,
        one_hot: bool | None = None,
        name: str | None = None,
        extract=None,
        pool: bool = False,
    ) -> None:
        super().__init__(module, name, extract, pool=pool)
        if int(num_codes) < 1 or int(heads) < 1:
            raise ValueError(f"num_codes and heads must be >= 1, got {num_codes} and {heads}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if dead not in ("ema", "window"):
            raise ValueError(f"dead must be 'ema' or 'window', got {dead!r}")
        self.num_codes = int(num_codes)
        self.heads = int(heads)
        self.ema_decay = float(ema_decay)
        self.dead_threshold = (
            0.01 / self.num_codes if dead_threshold is None else float(dead_threshold)
        )
        self.warmup_steps = (
            int(-(-1 // (1 - self.ema_decay))) if warmup_steps is None else int(warmup_steps)
        )
        self.dead = dead
        self.ignore_index = ignore_index
        self.one_hot = one_hot
        self._one_hot: dict[str, bool] = {}
        self._head_axis: dict[str, int] = {}  # a quantiser's head axis where it is not the last
        self.shared_heads = False  # heads read apart on one codebook (read at attach)

    def new_window(self) -> Window:
        H, K = self.heads, self.num_codes
        return Window(
            # "step": this training step's counts, folded into the EMA and into "recent" (the
            # latest steps, for the rules' latest value; kept across logs) by end_step
            {
                "counts": CodeCounts(H, K),
                "step": CodeCounts(H, K),
                "recent": RecentHits(H, K, _RECENT_STEPS),
                "ema": UsageEMA(H, K),
            },
            persistent=("ema",),
            transient=("recent",),  # (a checkpoint of an earlier version has none)
        )

    # ----------------------------------------------------------------- hot path
    def on_attach(self, setup, found) -> None:
        if _dist.is_distributed(setup.process_group):
            _warn_unsynced(self, found)
        if self.extract is None:  # (an extract= reads what its author chose)
            for path, mod in found:
                self._check_declared(path, mod)
        # transformers' Switch router returns a one-hot (tokens, experts) assignment
        self._one_hot = {
            path: self.one_hot
            if self.one_hot is not None
            else type(mod).__name__ in _ONE_HOT_ROUTERS
            for path, mod in found
        }

    def _check_declared(self, path: str, mod) -> None:
        """The codebooks a vector-quantize-pytorch quantiser declares against ``heads`` and
        ``num_codes``: a residual quantiser's ``num_quantizers`` codebooks, an FSQ's or LFQ's
        ``num_codebooks``, or a ``VectorQuantize``'s heads with a codebook each, return indices
        ``(..., n)`` into ``n`` codebooks, which pooled as one would count code 5 of one with
        code 5 of another (a usage of 1.0 for 0.84 / 0.97 / 1.00 apart).

        Raises:
            ValueError: ``heads`` is not the ``n`` codebooks, or ``num_codes`` not their size;
                a grouped quantiser (indices ``(groups, ..., n)``: no ``heads`` fits them).
        """
        if not any(c.__module__.startswith("vector_quantize_pytorch") for c in type(mod).__mro__):
            return
        kind = type(mod).__name__
        groups = int(getattr(mod, "groups", 1) or 1)
        if groups > 1 and hasattr(mod, "rvqs"):  # GroupedResidual{VQ,FSQ,LFQ}
            # (groups, ..., quantizers): the groups lead, where no heads= can read them
            raise self.error(
                path,
                f"a {kind} of {groups} groups returns indices (groups, ..., quantizers), one "
                f"codebook per group and quantizer: probe each group's quantiser apart "
                f"('{path}.rvqs.0', ...), or pass extract=",
            )
        layers = [int(getattr(mod, a, 1) or 1) for a in ("num_quantizers", "num_codebooks")]
        if groups != 1 or sum(n > 1 for n in layers) > 1:
            return  # (codebooks of codebooks: a layout not checked here)
        sizes = set(getattr(mod, "codebook_sizes", None) or ())
        if len(sizes) > 1:
            raise self.error(
                path,
                f"a {kind} whose codebooks hold {sorted(sizes)} codes: one CodebookUsage "
                f"counts codebooks of one size; probe its layers apart ('{path}.layers.0', ...)",
            )
        n = max(layers)
        if getattr(mod, "shared_codebook", False) or (
            int(getattr(mod, "heads", 1) or 1) > 1
            and getattr(mod, "separate_codebook_per_head", None) is False
        ):  # (one codebook: pooled or apart, both hold)
            n, self.shared_heads = 1, True
        elif getattr(mod, "separate_codebook_per_head", False):
            n = int(getattr(mod, "heads", 1))
        if int(n) > 1 and self.heads != int(n):
            raise self.error(
                path,
                f"a {kind} with {n} codebooks returns (..., {n}) indices, one into each: "
                f"heads={self.heads} would count them as one codebook; pass heads={n}",
            )
        size = getattr(mod, "codebook_size", None)
        if isinstance(size, int) and size != self.num_codes:
            raise self.error(
                path, f"num_codes={self.num_codes}, but the {kind}'s codebooks hold {size} codes"
            )
        if getattr(mod, "is_channel_first", False) and int(n) > 1:
            # ResidualFSQ(is_channel_first=True) returns (B, quantizers, H, W): the quantizer
            # axis second (counted last, a W equal to the quantizers mixed their codes)
            self._head_axis[path] = 1

    def _from_one_hot(self, hot: torch.Tensor, call) -> tuple[torch.Tensor, torch.Tensor]:
        """``(..., K)`` 0/1 assignments to ``(...)`` indices and whether a row has one."""
        K = self.num_codes
        if hot.shape[-1] != K:
            raise self.error(
                call.path, f"one-hot assignments must be (..., {K}), got {tuple(hot.shape)}"
            )
        total = hot.sum(-1)
        if hot.device.type == "cpu" and bool(((hot != 0) & (hot != 1)).any() | (total > 1).any()):
            raise self.error(call.path, "one-hot assignments must hold one 1 per row at most")
        return hot.argmax(-1), total == 1

    def update(self, window, idx, call) -> None:
        H = self.heads
        assigned = None
        if self._one_hot[call.path]:  # rows without an assignment (dropped by capacity): skipped
            idx, assigned = self._from_one_hot(idx, call)
        axis = self._head_axis.get(call.path)
        if axis is not None and idx.ndim > axis:
            idx = idx.movedim(axis, -1)
        if H > 1 and (idx.ndim < 1 or idx.shape[-1] != H):
            raise self.error(
                call.path,
                f"expected indices of shape (..., {H}) for heads={H}, got {tuple(idx.shape)}",
            )
        shape = idx.shape
        idx = idx.reshape(-1, H)
        if idx.dtype != torch.int64:  # (compared with ignore_index below; uint8 has no -1)
            idx = idx.to(torch.int64)
        valid = None if assigned is None else assigned.reshape(-1, H)
        if self.ignore_index is not None:
            valid = _both(valid, idx != self.ignore_index)
        padding = self._padding(call, shape, idx.shape[0], idx.device)
        if padding is not None:
            valid = _both(valid, padding[:, None].expand_as(idx))
        if call.strict:  # (else CodeCounts counts them; the message costs a host sync)
            bad = (idx < 0) | (idx >= self.num_codes)
            bad = bad if valid is None else bad & valid
            call.bad_rows(
                bad,
                lambda: (
                    f"code indices out of range [0, {self.num_codes}): {int(bad.sum())} "
                    f"entries, min {int(idx[bad].min())}, max {int(idx[bad].max())} "
                    f"(ignore_index={self.ignore_index})"
                ),
            )
        window["counts"].update(idx, valid, also=window["step"])

    def _padding(self, call, shape, rows: int, device) -> torch.Tensor | None:
        """``(rows,)`` real positions: the ``mask=`` the module was called with
        (vector-quantize-pytorch's convention, true for real positions; ``LFQ`` does not mark
        masked positions ``-1`` itself), else the token padding (``observe(mask=)`` or the
        model's ``attention_mask``: a router's padded tokens)."""
        mask = (call.kwargs or {}).get("mask")
        if (
            isinstance(mask, torch.Tensor)
            and mask.dtype == torch.bool
            and tuple(mask.shape) == tuple(shape[: mask.ndim])
        ):
            return to_device(mask.reshape(-1), device).repeat_interleave(rows // mask.numel())
        return token_rows(call, rows, device)

    def step_values(self, window) -> dict[str, torch.Tensor]:
        """``hits``: this step's hits per code ``(H, K)`` (on this rank)."""
        return {"hits": window["step"].counts}

    def end_step(self, window) -> None:
        window["ema"].advance(window["step"], self.ema_decay)
        window["recent"].advance(window["step"])
        window["step"].reset()

    def end_missed_step(self, window) -> None:
        window["recent"].advance(None)  # under DDP the other ranks' step is this step

    def end_window(self, window, reduced) -> None:
        window.reset(keep=("recent",))  # the latest steps reach back across logs

    def on_replaced(self, window, mask: torch.Tensor) -> None:
        window["ema"].restart(mask.to(window.device))

    # ----------------------------------------------------------------- readout
    def readout(self, window) -> Readout:
        win, ema = window["counts"], window["ema"]
        # a head with no index in the window (a quantizer ResidualVQ's quantize_dropout left
        # out on every step) shows nothing: not a usage of 0 or every code dead
        seen = win.counts.sum(-1) > 0
        if self.dead == "window" or ema.steps < self.warmup_steps:  # (or the EMA warms up)
            dead = win.counts == 0
        else:
            dead = dead_codes(ema.hits, ema.rows, self.dead_threshold)
        dead &= seen[:, None]
        stats = usage_from_counts(win.counts)
        unseen = torch.where(seen, 0.0, torch.nan)  # (H,): NaN is not logged
        per_head = {
            "perplexity": stats["perplexity"],
            "perplexity_ratio": stats["perplexity"] / self.num_codes,
            "usage": stats["usage"] + unseen,
            "usage_uniform": stats["usage_uniform"] + unseen,
            "usage_ratio": stats["usage"] / stats["usage_uniform"],
            f"dead_{self.unit}": dead.sum(-1).to(_F64) + unseen,
            "dead_fraction": dead.to(_F64).mean(-1) + unseen,
            "samples": stats["samples"],
            "skipped": win.skipped.to(_F64),
            "out_of_range": win.out_of_range.to(_F64),
            **self._extra_metrics(win),
        }
        metrics = {}
        for name, values in per_head.items():
            values = values.tolist()
            if self.heads == 1:
                metrics[self.key(name)] = values[0]
            else:
                for h, v in enumerate(values):
                    metrics[self.key(name, index=f"head_{h}")] = v
        metrics.update(self._recent(window["recent"]))
        if self.heads > 1:  # over the heads the window saw (NaN: none)
            metrics[self.key(f"dead_{self.unit}")] = float(dead.sum()) if seen.any() else _NAN
            metrics[self.key("dead_fraction")] = float(per_head["dead_fraction"].nanmean())
            # usage: the mean; the collapse ratios: the worst head's (see _over_heads)
            for name, worst in _OVER_HEADS.items():
                metrics[self.key(name)] = self._over_heads(per_head[name] + unseen, worst)
            metrics[self.key("skipped")] = float(win.skipped.sum())
            metrics[self.key("out_of_range")] = float(win.out_of_range.sum())
        counts = win.counts.clone()  # the window is reset in place after the log
        if self.heads == 1:
            histograms = {self.key("usage_hist"): counts[0]}
        else:
            histograms = {
                self.key("usage_hist", index=f"head_{h}"): counts[h] for h in range(self.heads)
            }
        return Readout(metrics, histograms, self._pictures(counts), {self.key("dead"): dead})

    def _recent(self, recent: RecentHits) -> dict[str, float]:
        """``usage_recent`` over the fewest latest steps whose indices would show a uniform
        codebook 90% of its codes (with fewer, the usage is low by construction: none)."""
        rows = recent.rows_back().cumsum(-1).to(_F64)  # (H, n): indices in the latest 1..n steps
        uniform = 1.0 - (1.0 - 1.0 / self.num_codes) ** rows
        enough = (uniform >= _RECENT_UNIFORM).all(0).nonzero()
        if not len(enough):
            return {}
        steps = int(enough[0]) + 1
        usage = recent.usage(steps)  # (H,)
        out = {
            self.key("usage_recent"): self._over_heads(usage, worst=False),
            self.key("usage_recent_steps"): float(steps),
        }
        if self.num_codes > 1:  # codes hit in those steps (a single code: total collapse)
            out[self.key(f"{self.unit}_used_recent")] = (
                self._over_heads(usage, True) * self.num_codes
            )
        return out

    def _over_heads(self, values: torch.Tensor, worst: bool) -> float:
        """One value of the heads' ``(H,)`` values (NaN: a head the window did not see): their
        mean, or with ``worst`` and a codebook per head, the lowest."""
        values = values[~values.isnan()]
        if not len(values):
            return _NAN
        return float(values.min() if worst and not self.shared_heads else values.mean())

    def _extra_metrics(self, win: CodeCounts) -> dict[str, torch.Tensor]:
        return {}

    def _pictures(self, counts: torch.Tensor) -> dict[str, Picture]:
        counts = counts[:1]
        if not counts.sum() > 0:
            return {}
        perplexity = usage_from_counts(counts)["perplexity"].item()
        p = counts[0].to(_F64) / counts.sum()
        K = p.numel()
        return {
            self.key("usage_sorted"): Picture(
                "bars",
                p.sort(descending=True).values,
                f"{self.unit} by usage{' (head 0)' if self.heads > 1 else ''}: perplexity "
                f"{perplexity:.1f} of {K}; uniform = {1 / K:.2g}",
                f"{self.unit} (sorted)",
                "fraction of rows",
                reference=1.0 / K,
            )
        }


class LatentUsage(CodebookUsage):
    """How often each latent of a sparse autoencoder fires (activation > threshold).

    Reads the module's output activations ``(..., L)`` (``extract=`` otherwise). Reports
    ``dead_latents`` / ``dead_fraction`` (latents that did not fire in the whole window, the SAE
    convention; ``dead="ema"`` for the EMA rule), ``usage`` (fraction that fired;
    ``usage_recent``: the latest steps alone, from ``2.3 L`` rows; ``usage_uniform``:
    the usage the window's fires would show spread uniformly), ``fire_rate``
    (mean active latents per row, L0), ``perplexity`` of the firing distribution, ``samples``
    (rows), ``skipped`` (rows with NaN or Inf, and padded tokens: ``observe(mask=)`` or the
    model's ``attention_mask``, left out) and a ``usage_hist`` of fires per latent
    (:func:`~collapse_monitor.functional.latent_usage`).

    Args:
        module: path of the module whose output are the latent activations.
        num_latents: ``L``.
        threshold: a latent fires when its activation is above this (default 0).
        dead: ``"window"`` (default) or ``"ema"`` (see :class:`CodebookUsage`).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from collapse_monitor import CollapseMonitor, probes
        >>> model = nn.Sequential(nn.ReLU())
        >>> mon = CollapseMonitor(model, [probes.LatentUsage("0", 4, name="sae")], 1)
        >>> with mon.observe():
        ...     _ = model(torch.tensor([[1.0, 2.0, -1.0, -1.0], [1.0, 0.0, -1.0, -1.0]]))
        >>> m = mon.step()
        >>> m["collapse/sae/dead_latents"], m["collapse/sae/fire_rate"]
        (2.0, 1.5)
        >>> mon.close()
    """

    reads = Reading("floating-point latent activations (..., L)", floating(1), hint="activations")
    unit = "latents"
    rules = (
        RuleSpec(
            "dead_fraction",
            0.5,
            "above",
            name="dead_above",
            requires=("dead_latents", "above", -1.0),  # this class's runs only (report replays)
            message="most latents are dead: resample them (re-initialise their encoder rows)",
        ),
    )

    def __init__(
        self,
        module: str,
        num_latents: int,
        threshold: float = 0.0,
        dead: str = "window",
        name: str | None = None,
        extract=None,
        **kwargs,
    ) -> None:
        super().__init__(
            module, num_latents, dead=dead, ignore_index=None, name=name, extract=extract, **kwargs
        )
        self.threshold = float(threshold)

    def update(self, window, acts, call) -> None:
        if acts.shape[-1] != self.num_codes:
            raise self.error(
                call.path, f"expected activations (..., {self.num_codes}), got {tuple(acts.shape)}"
            )
        acts = acts.detach().reshape(-1, self.num_codes)
        finite = finite_rows(acts)  # rows with NaN or Inf, and padded tokens: skipped
        padding = token_rows(call, acts.shape[0], acts.device)
        if padding is not None:
            finite &= padding
        fires = (acts > self.threshold) & finite[:, None]
        hits = fires.sum(0, dtype=torch.int64)[None]
        rows = finite.sum(dtype=torch.int64)[None]
        for name in ("counts", "step"):
            window[name].add_counts(hits, rows, (~finite).sum()[None])

    def _extra_metrics(self, win: CodeCounts) -> dict[str, torch.Tensor]:
        return {"fire_rate": fire_rate(win.counts, win.rows), "samples": win.rows.to(_F64)}


def _both(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else a & b


def _warn_unsynced(probe, found) -> None:
    """Warn of vector-quantize-pytorch codebooks that change without their all-reduce under
    ``torch.distributed``: EMA updates, or dead codes replaced from each rank's own batch. Its
    ``sync_codebook`` default is decided once per process, when the first ``VectorQuantize``
    is built, from whether a process group existed then."""
    unsynced = [
        f"{path}.{name}" if name else path
        for path, mod in found
        for name, sub in mod.named_modules()
        if getattr(sub, "use_ddp", None) is False
        and (
            (getattr(sub, "ema_update", False) and not getattr(sub, "learnable_codebook", False))
            # (1.34 replaced threshold_ema_dead_code by dead_code_threshold_ratio)
            or (getattr(sub, "threshold_ema_dead_code", 0) or 0) > 0
            or (getattr(sub, "dead_code_threshold_ratio", 0) or 0) > 0
        )
    ]
    if unsynced:
        log.warning(
            "%r: the codebooks %s change without an all-reduce between the ranks "
            "(vector-quantize-pytorch's sync_codebook is off: it decides once per process, "
            "when the first VectorQuantize is built, and no process group existed then). Under "
            "DDP, which broadcasts rank 0's buffers, only rank 0's batches update an EMA "
            "codebook; a learned one, or FSDP and DeepSpeed, let each rank's codes drift apart, "
            "and the usage pooled over the ranks is then no one model's: pass "
            "sync_codebook=True, or build the quantisers after init_process_group",
            probe,
            unsynced,
        )
