"""Code usage counts for vector quantisers, MoE routers and sparse-autoencoder latents
(docs/metrics.md#codebookusage): window hit counts and an exponential moving average of them."""

from __future__ import annotations

import torch

from .base import Statistic

_F64 = torch.float64


class CodeCounts(Statistic):
    """Hits per code of ``H`` codebooks (heads) of ``K`` codes, pooled over a window.

    States: ``counts (H, K) int64``, ``rows (H,) int64`` (indices counted per head),
    ``skipped (H,) int64`` (placeholder or masked positions: nothing there, not a sample) and
    ``out_of_range (H,) int64`` (indices outside ``[0, K)``: left out, counted).

    Example:
        >>> import torch
        >>> from collapse_monitor.stats import CodeCounts
        >>> c = CodeCounts(heads=1, num_codes=4)
        >>> c.update(torch.tensor([[0], [0], [3]]))
        >>> c.counts
        tensor([[2, 0, 0, 1]])
    """

    def __init__(self, heads: int, num_codes: int) -> None:
        super().__init__()
        self.heads, self.num_codes = int(heads), int(num_codes)
        self.add_state("counts", (self.heads, self.num_codes), torch.int64)
        self.add_state("rows", (self.heads,), torch.int64)
        self.add_state("skipped", (self.heads,), torch.int64)
        self.add_state("out_of_range", (self.heads,), torch.int64)

    def update(  # (integer and boolean inputs: no autograd to turn off)
        self,
        indices: torch.Tensor,
        valid: torch.Tensor | None = None,
        also: CodeCounts | None = None,
    ) -> None:
        """Count ``indices (N, H)`` (any integer dtype); entries where ``valid (N, H)`` is false
        are skipped.

        Indices outside ``[0, K)`` among the valid ones are excluded and counted in
        ``out_of_range``. ``also``: another statistic of the same codebooks that counts the
        same indices (a step's beside the window's), at the cost of its additions only.

        Raises:
            TypeError: floating-point or boolean indices.
        """
        H, K = self.heads, self.num_codes
        if indices.dtype != torch.int64:  # (uint8's -1 is 255; the bins below are int64)
            if indices.is_floating_point() or indices.dtype == torch.bool:
                raise TypeError(f"code indices must be integers, got {indices.dtype}")
            indices = indices.to(torch.int64)
        # one histogram of H blocks of K + 2 bins: the codes, then "out of range" (a valid
        # index outside [0, K)) and "skipped" (an invalid entry, whatever its index)
        bins = indices.clamp(-1, K).remainder_(K + 1)  # (-1 and K, either side, go to K)
        if valid is not None:
            bins = torch.where(valid, bins, K + 1)
        if H > 1:  # (the heads' blocks side by side)
            bins = bins + torch.arange(H, device=indices.device) * (K + 2)
        flat = bins.reshape(-1)
        if flat.device.type == "cpu":  # (one pass)
            hist = torch.bincount(flat, minlength=H * (K + 2)).view(H, K + 2)
        else:  # index_add_, not bincount: on CUDA bincount reads the indices' max to the host
            hist = torch.zeros(H * (K + 2), dtype=torch.int64, device=flat.device)
            hist = hist.index_add_(0, flat, torch.ones_like(flat)).view(H, K + 2)
        hits, out, skipped = hist[:, :K], hist[:, K], hist[:, K + 1]
        rows = hits.sum(1)
        for stat in (self,) if also is None else (self, also):
            states = [stat.counts, stat.rows, stat.out_of_range, stat.skipped]
            torch._foreach_add_(states, [hits, rows, out, skipped])

    def add_counts(
        self, hits: torch.Tensor, rows: torch.Tensor, skipped: torch.Tensor | int = 0
    ) -> None:
        """Add precomputed ``hits (H, K)``, ``rows (H,)`` and ``skipped (H,)`` (e.g. latents
        firing per row, rows left out)."""
        self.counts += hits
        self.rows += rows
        self.skipped += skipped


class RecentHits(Statistic):
    """When each code was last hit and how many indices each of the latest ``R`` steps held:
    the usage of any trailing run of up to ``R`` steps, in ``O(H*(K+R))`` memory.

    States: ``step () int64`` (steps passed, recorded or not: equal on every rank, as every rank
    passes every step), ``last_hit (H, K) int64`` (the step of each code's latest hit, 0: none;
    combined over ranks by ``max``) and ``rows (H, R) int64`` (indices per step, a ring indexed by
    ``step % R``; summed over ranks). Updates are tensor operations: no host sync.

    Example:
        >>> import torch
        >>> from collapse_monitor.stats import CodeCounts, RecentHits
        >>> step, recent = CodeCounts(1, 4), RecentHits(1, 4, steps=8)
        >>> step.update(torch.tensor([[0], [1]])); recent.advance(step); step.reset()
        >>> step.update(torch.tensor([[1], [1]])); recent.advance(step)
        >>> recent.usage(steps=1), recent.usage(steps=2)
        (tensor([0.2500], dtype=torch.float64), tensor([0.5000], dtype=torch.float64))
    """

    def __init__(self, heads: int, num_codes: int, steps: int) -> None:
        super().__init__()
        self.capacity = int(steps)
        self.add_state("step", (), torch.int64, reduce="same")
        self.add_state("last_hit", (heads, num_codes), torch.int64, reduce="max")
        self.add_state("rows", (heads, self.capacity), torch.int64)

    def advance(self, step: CodeCounts | None) -> None:  # (integer states: no autograd)
        """One step passed; ``step``: its counts (``None``: nothing recorded on this rank)."""
        self.step += 1
        slot = (self.step % self.capacity).view(1)
        if step is None:
            self.rows.index_fill_(1, slot, 0)
            return
        self.rows.index_copy_(1, slot, step.rows[:, None])
        torch.where(step.counts > 0, self.step, self.last_hit, out=self.last_hit)

    def rows_back(self) -> torch.Tensor:
        """``(H, n)`` indices of the latest ``n = min(step, R)`` steps, newest first."""
        S = int(self.step)
        n = min(S, self.capacity)
        slots = (S - torch.arange(n)) % self.capacity
        return self.rows.cpu()[:, slots]

    def usage(self, steps: int) -> torch.Tensor:
        """``(H,)`` float64: the fraction of codes hit in the latest ``steps`` steps."""
        return (self.last_hit > int(self.step) - steps).to(_F64).mean(-1)

    def align(self, group) -> None:
        pass  # ``step`` is equal on every rank by construction

    def merge(self, other: RecentHits) -> RecentHits:
        """Another rank's part of the same steps (``step`` equal): latest hits and counts."""
        torch.maximum(self.last_hit, other.last_hit.to(self.device), out=self.last_hit)
        self.rows += other.rows.to(self.device)
        return self


class UsageEMA(Statistic):
    """Exponential moving averages of hits per code ``(H, K)`` and of indices per head ``(H,)``,
    advanced once per training step from that step's counts (``pending_*``).

    Both are linear in the per-step counts, so their sum over ranks is the EMA of the global
    counts exactly; their ratio is the smoothed usage in hits per index. ``steps`` counts the
    steps advanced (the EMA's age; the most of any rank).

    Example:
        >>> import torch
        >>> from collapse_monitor.stats import CodeCounts, UsageEMA
        >>> step, ema = CodeCounts(1, 2), UsageEMA(1, 2)
        >>> step.update(torch.tensor([[0], [0]]))
        >>> ema.advance(step, decay=0.5)
        >>> ema.hits, ema.rows
        (tensor([[1., 0.]], dtype=torch.float64), tensor([1.], dtype=torch.float64))
    """

    def __init__(self, heads: int, num_codes: int) -> None:
        super().__init__()
        self.add_state("hits", (heads, num_codes), _F64)
        self.add_state("rows", (heads,), _F64)
        self.add_state("steps", (), torch.int64, reduce="max")

    def advance(self, step: CodeCounts, decay: float) -> None:  # (from counts: no autograd)
        """``ema = decay * ema + (1 - decay) * counts of this step``."""
        ema = [self.hits, self.rows]
        torch._foreach_mul_(ema, decay)
        torch._foreach_add_(ema, [step.counts, step.rows], alpha=1 - decay)
        self.steps += 1

    @torch.no_grad()
    def restart(self, mask: torch.Tensor) -> None:
        """Give the codes in ``mask (H, K)`` a uniform share of the rows: replaced codes are judged
        dead again only once the EMA has forgotten that share."""
        share = (self.rows / self.hits.shape[1])[:, None].expand_as(self.hits)
        self.hits.copy_(torch.where(mask, share, self.hits))  # no host sync (boolean indexing)
