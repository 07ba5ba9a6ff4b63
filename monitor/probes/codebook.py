"""Codebook collapse (METRICS.md section 2): code usage of VQ layers, MoE routers, SAE latents."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .. import _dist
from ..functional.codebook import usage_from_counts
from ..pictures import Picture
from ..rules import Rule
from ..stats import SumStatistic
from .base import Probe

_F64 = torch.float64


class UsageCounts(SumStatistic):
    """Window state: hits per code ``(H, K)`` int64, rows per head ``(H,)``, skipped entries."""

    def __init__(self, heads: int, num_codes: int) -> None:
        super().__init__()
        self.add_state("counts", (heads, num_codes), torch.int64)
        self.add_state("rows", (heads,), torch.int64)
        self.add_state("skipped", (), torch.int64)


class UsageEMA(SumStatistic):
    """Exponential moving averages of hits per code and rows per step, ``(H, K)`` and ``(H,)``.

    Both are linear in the per-step counts, so summing them over ranks gives the EMA of the global
    counts exactly; their ratio is the smoothed usage in hits per row.
    """

    def __init__(self, heads: int, num_codes: int) -> None:
        super().__init__()
        self.add_state("hits", (heads, num_codes), _F64)
        self.add_state("rows", (heads,), _F64)


class CodebookUsage(Probe):
    """Pooled code usage of a vector quantiser (or router, or any module emitting code indices).

    Indices are read from the module's output: an integer tensor, or the single integer tensor in
    a tuple/list/dict output (``vector_quantize_pytorch.VectorQuantize`` returns
    ``(quantized, indices, loss)``); ``extract(module, args, output)`` otherwise.

    Args:
        module: path of the quantiser module.
        num_codes: ``K``, codes per codebook.
        heads: ``H``; with ``H > 1`` the last dimension of the indices is the head and every
            head has its own counts, reported as ``.../head_<h>``. With ``H = 1`` every index
            counts (e.g. the ``(tokens, k)`` top-k choices of an MoE router).
        ema_decay: decay ``d`` of the usage EMA, advanced once per observed training step.
        dead_threshold: a code is dead when its EMA usage, in hits per row (a row is one index
            per head), is below this; default ``0.01 / K`` (1% of a uniform share).
        warmup_steps: observed steps before any code may be called dead (the EMA starts at 0);
            default ``ceil(1 / (1 - d))``.
        dead: ``"ema"`` (default) or ``"window"`` (dead = no hit in the whole window).

    Reports ``perplexity`` (``exp`` of the entropy of the pooled window counts, in ``[1, K]``),
    ``perplexity_ratio`` (``perplexity / K``), ``usage`` (fraction of codes hit in the window),
    ``dead_codes``, ``dead_fraction`` and ``samples`` (hits in the window), plus a
    histogram ``usage_hist`` of hits per code. Hot path: one ``index_add_`` per call, no host sync
    (on the CPU, out-of-range indices raise at once; elsewhere they are counted, excluded and raised
    at the next log). State: ``24*H*K + 24*H`` bytes.
    """

    unit = "codes"

    every_step = True  # O(B*D) per update

    def __init__(
        self,
        module: str,
        num_codes: int,
        heads: int = 1,
        ema_decay: float = 0.99,
        dead_threshold: float | None = None,
        warmup_steps: int | None = None,
        dead: str = "ema",
        name: str | None = None,
        extract=None,
    ) -> None:
        super().__init__(module, name, extract)
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
        # made at attach, never here: Lightning's ddp_spawn sends probes to the workers through
        # torch.multiprocessing, which would put a tensor made here in memory shared by all ranks
        self.ema: UsageEMA | None = None
        self.observed_steps = 0
        self._last: dict | None = None  # reduced state of the last compute()

    def attach(self, model, monitor) -> None:
        self.ema = UsageEMA(self.heads, self.num_codes)
        super().attach(model, monitor)

    def new_window(self) -> UsageCounts:
        win = UsageCounts(self.heads, self.num_codes).to(self.ema.device)
        win.step = UsageEMA(self.heads, self.num_codes).to(self.ema.device)  # this step's counts
        return win

    def default_rules(self) -> list[Rule]:
        prefix = f"collapse/{self.name}"
        return [
            Rule(
                f"{prefix}/usage",
                0.5,
                "below",
                patience=2,
                name=f"{self.name}/usage_below",
                message="under half the codebook is used: consider ResetDeadCodes "
                "(meaningful once the window holds >> K samples)",
            ),
            Rule(
                f"{prefix}/perplexity_ratio",
                0.1,
                "below",
                patience=2,
                name=f"{self.name}/perplexity_below",
            ),
        ]

    # ----------------------------------------------------------------- hot path
    def _indices(self, path, module, args, output) -> torch.Tensor:
        if self.extract is not None:
            idx = self.extract(module, args, output)
        else:
            idx = _single_integer_tensor(output)
            if idx is None:
                raise self.error(
                    path,
                    f"found no single integer tensor of code indices in the output "
                    f"({_describe(output)}); pass extract=lambda module, args, output: indices",
                )
        if not isinstance(idx, torch.Tensor):
            raise self.error(path, f"code indices must be a Tensor, got {type(idx).__name__}")
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise self.error(path, f"code indices must be integers, got dtype {idx.dtype}")
        if self.heads > 1:
            if idx.ndim < 1 or idx.shape[-1] != self.heads:
                raise self.error(
                    path,
                    f"expected indices of shape (..., {self.heads}) for heads={self.heads}, "
                    f"got {tuple(idx.shape)}",
                )
            return idx.reshape(-1, self.heads)
        return idx.reshape(-1, 1)

    def observe(self, path, module, args, kwargs, output) -> None:
        idx = self._indices(path, module, args, output).to(torch.int64)
        ok = (idx >= 0) & (idx < self.num_codes)
        if idx.device.type == "cpu":  # checking costs no device sync here
            if not bool(ok.all()):
                bad = idx[~ok]
                raise self.error(
                    path,
                    f"code indices out of range [0, {self.num_codes}): {bad.numel()} "
                    f"entries, min {int(bad.min())}, max {int(bad.max())}",
                )
        H, K = self.heads, self.num_codes
        flat = (torch.where(ok, idx, 0) + torch.arange(H, device=idx.device) * K).reshape(-1)
        hits = torch.zeros(H * K, dtype=torch.int64, device=idx.device)
        hits.index_add_(0, flat, ok.reshape(-1).to(torch.int64))
        valid = ok.sum(0)
        self._add(hits.view(H, K), valid, idx.numel() - valid.sum())

    def _add(self, hits: torch.Tensor, rows: torch.Tensor, skipped) -> None:
        """Add ``hits`` ``(H, K)`` and ``rows`` ``(H,)`` of one forward call to the window."""
        win = self.window
        if win.counts.device != hits.device:
            win.to(hits.device)
            win.step.to(hits.device)
            self.ema.to(hits.device)
        win.counts += hits
        win.rows += rows
        win.skipped += skipped
        win.step.hits += hits
        win.step.rows += rows

    def end_step(self) -> None:
        step = self.window.step
        d = self.ema_decay
        self.ema.hits.mul_(d).add_(step.hits, alpha=1 - d)
        self.ema.rows.mul_(d).add_(step.rows, alpha=1 - d)
        step.reset()
        self.observed_steps += 1

    # ----------------------------------------------------------------- readout
    def compute(self, group=None) -> dict[str, float]:
        win, ema = self.window, self.ema
        if _dist.is_distributed(group):
            win, ema = win.clone().all_reduce(group), ema.clone().all_reduce(group)
        if int(win.skipped):  # only off the CPU: there out-of-range indices raise at once
            raise ValueError(
                f"{type(self).__name__} '{self.name}': {int(win.skipped)} code indices outside "
                f"[0, {self.num_codes}) in this window (they were excluded)"
            )
        stats = usage_from_counts(win.counts)
        if self.dead == "window":
            dead = win.counts == 0
        elif self.observed_steps >= self.warmup_steps:
            dead = ema.hits < self.dead_threshold * ema.rows[:, None]
        else:
            dead = torch.zeros_like(win.counts, dtype=torch.bool)
        self._last = {"dead": dead, "counts": win.counts}
        return self._metrics(stats, dead, win)

    def _metrics(self, stats, dead, win) -> dict[str, float]:
        K, unit = self.num_codes, self.unit
        per_head = {
            "perplexity": stats["perplexity"],
            "perplexity_ratio": stats["perplexity"] / K,
            "usage": stats["usage"],
            f"dead_{unit}": dead.sum(-1).to(_F64),
            "dead_fraction": dead.to(_F64).mean(-1),
            "samples": stats["samples"],
        }
        per_head.update(self._extra_metrics(win))
        out: dict[str, float] = {}
        for key, values in per_head.items():
            values = values.tolist()
            if self.heads == 1:
                out[key] = values[0]
            else:
                out.update({f"{key}/head_{h}": v for h, v in enumerate(values)})
        if self.heads > 1:
            out[f"dead_{unit}"] = float(dead.sum())
            out["dead_fraction"] = float(dead.to(_F64).mean())
            out["usage"] = float(stats["usage"].mean())
        return out

    def _extra_metrics(self, win) -> dict[str, torch.Tensor]:
        return {}

    def histograms(self) -> dict[str, torch.Tensor]:
        if self._last is None:
            return {}
        counts = self._last["counts"]
        if self.heads == 1:
            return {"usage_hist": counts[0]}
        return {f"usage_hist/head_{h}": counts[h] for h in range(self.heads)}

    def pictures(self) -> dict[str, Picture]:
        if self._last is None:
            return {}
        counts = self._last["counts"][:1]
        if not counts.sum() > 0:
            return {}
        perplexity = usage_from_counts(counts)["perplexity"].item()
        p = counts[0].to(_F64) / counts.sum()
        K = p.numel()
        return {
            "usage_sorted": Picture(
                "bars",
                p.sort(descending=True).values,
                f"{self.unit} by usage{' (head 0)' if self.heads > 1 else ''}: perplexity "
                f"{perplexity:.1f} of {K}; uniform = {1 / K:.2g}",
                f"{self.unit} (sorted)",
                "fraction of rows",
                reference=1.0 / K,
            )
        }

    def dead_mask(self) -> torch.Tensor:
        """``(H, K)`` bool: the dead codes of the last :meth:`compute` (identical on all ranks)."""
        if self._last is None:
            raise RuntimeError(f"{self!r}: dead_mask() before any compute()")
        return self._last["dead"]

    def revive(self, mask: torch.Tensor) -> None:
        """Give replaced codes a fresh EMA: a uniform share of this rank's rows, so they are
        judged dead again only once the EMA has forgotten that share."""
        with torch.no_grad():
            share = (self.ema.rows / self.num_codes)[:, None].expand_as(self.ema.hits)
            self.ema.hits[mask] = share[mask]
            if self._last is not None:
                self._last["dead"] = self._last["dead"] & ~mask

    # ----------------------------------------------------------------- persistence
    def state_dict(self, group=None, sync: bool = True) -> dict:
        win, ema = self.window, self.ema
        if sync and _dist.is_distributed(group):
            win, ema = win.clone().all_reduce(group), ema.clone().all_reduce(group)
        return {
            "window": win.state_dict(),
            "ema": ema.state_dict(),
            "observed_steps": self.observed_steps,
        }

    def load_state_dict(self, state: dict, keep_window: bool = True) -> None:
        win = self.new_window()
        win.load_state_dict(state["window"])
        if not keep_window:
            win.reset()
        self.window = win
        # every rank loads the same (rank 0's) EMA; the others start from zero so the sum over
        # ranks stays the global EMA
        self.ema.load_state_dict(state["ema"])
        if not keep_window:
            self.ema.reset()
        self.observed_steps = int(state["observed_steps"])


class LatentUsage(CodebookUsage):
    """How often each latent of a sparse autoencoder fires (activation > threshold).

    Reads the module's output activations ``(..., L)`` (``extract=`` otherwise). Reports
    ``dead_latents`` / ``dead_fraction`` (latents that did not fire in the whole window, the SAE
    convention; ``dead="ema"`` for the EMA rule), ``usage`` (fraction that fired), ``fire_rate``
    (mean active latents per row, L0), ``perplexity`` of the firing distribution, ``samples``
    (rows) and a ``usage_hist`` of fires per latent.

    Args:
        module: path of the module whose output are the latent activations.
        num_latents: ``L``.
        threshold: a latent fires when its activation is above this (default 0).
        dead: ``"window"`` (default) or ``"ema"`` (see :class:`CodebookUsage`).
    """

    unit = "latents"

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
        super().__init__(module, num_latents, dead=dead, name=name, extract=extract, **kwargs)
        self.threshold = float(threshold)

    def default_rules(self) -> list[Rule]:
        return [
            Rule(
                f"collapse/{self.name}/dead_fraction",
                0.5,
                "above",
                patience=2,
                name=f"{self.name}/dead_above",
                message="most latents are dead: resample them (re-initialise their encoder rows)",
            )
        ]

    def observe(self, path, module, args, kwargs, output) -> None:
        acts = self.extract(module, args, output) if self.extract is not None else output
        if not isinstance(acts, torch.Tensor) or not acts.is_floating_point():
            raise self.error(
                path,
                f"expected floating-point latent activations, got {_describe(acts)}; "
                "pass extract=lambda module, args, output: activations",
            )
        if acts.ndim < 1 or acts.shape[-1] != self.num_codes:
            raise self.error(
                path, f"expected activations (..., {self.num_codes}), got {tuple(acts.shape)}"
            )
        fires = acts.detach().reshape(-1, self.num_codes) > self.threshold
        rows = torch.full((1,), fires.shape[0], dtype=torch.int64, device=fires.device)
        self._add(fires.sum(0, dtype=torch.int64)[None], rows, 0)

    def _extra_metrics(self, win) -> dict[str, torch.Tensor]:
        rows = win.rows.to(_F64)
        return {"fire_rate": win.counts.sum(-1).to(_F64) / rows, "samples": rows}


def _single_integer_tensor(output):
    """The one integer tensor of an output (itself, or in a tuple/list/dict), else None."""

    def is_index(v):
        return isinstance(v, torch.Tensor) and not (
            v.is_floating_point() or v.is_complex() or v.dtype == torch.bool
        )

    if isinstance(output, torch.Tensor):
        return output if is_index(output) else None
    if isinstance(output, Mapping):
        values = list(output.values())
    elif isinstance(output, (tuple, list)):
        values = list(output)
    else:
        return None
    found = [v for v in values if is_index(v)]
    return found[0] if len(found) == 1 else None


def _describe(obj) -> str:
    if isinstance(obj, torch.Tensor):
        return f"Tensor {obj.dtype} {tuple(obj.shape)}"
    if isinstance(obj, Mapping):
        return "dict(" + ", ".join(f"{k}={_describe(v)}" for k, v in obj.items()) + ")"
    if isinstance(obj, (tuple, list)):
        return type(obj).__name__ + "(" + ", ".join(_describe(v) for v in obj) + ")"
    return type(obj).__name__
