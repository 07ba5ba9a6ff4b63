"""Per-class feature moments for neural-collapse metrics (METRICS.md 0.2, 1.1, 1.5).

Power sums are accumulated around a per-class shift ``K_c`` so that the readout
``Sigma_W = (S - sum_c s_c s_c' / n_c) / N`` does not cancel catastrophically when the within-class
variance is tiny compared with the class means (the collapsed regime this monitor exists to see).
``K_c`` is the class's mean in the first batch it appears in, and the previous window's mean
afterwards, so the cancellation factor is ``||mu_c - K_c||^2 / lambda`` ~ O(1) instead of
``||mu_c||^2 / lambda``. The readout formulas are exact for any shift; the shift only buys digits.
"""

from __future__ import annotations

import torch

from .. import _dist
from ..functional.neural_collapse import share_rows
from .base import Statistic

_F64 = torch.float64


class ClassMoments(Statistic):
    """Streaming per-class counts, shifted sums and a pooled shifted second moment.

    States, for ``C`` classes and ``D`` feature dimensions (``D`` is fixed by the first update
    when not given):

    - ``count``: ``(C,) int64``, samples per class in the window.
    - ``shift``: ``(C, D) float64``, ``K_c``; zero until the class is first seen.
    - ``shift_set``: ``(C,) bool``.
    - ``shift_agreed``: ``(C,) bool``, shifts that came from a reduced window (identical on every
      rank): the all-reduce adds their sums as they are and re-centres only the others.
    - ``sum``: ``(C, D) float64``, ``s_c = sum_{i in c} (h_i - K_c)``.
    - ``sq_norm``: ``(C,) float64``, ``q_c = sum_{i in c} ||h_i - K_c||^2`` (CDNV variances).
    - ``second_moment``: ``(D, D) float64``, ``S = sum_i (h_i - K_{y_i})(h_i - K_{y_i})'``;
      with ``diagonal=True`` only its diagonal ``(D,)`` (per-coordinate variances).

    Memory is ``16*C*D + 8*D*D`` bytes (``8*D`` for the diagonal) plus O(C), independent of
    samples and steps. ``update`` is vectorised (``index_add_`` and one GEMM), never loops over
    classes and never synchronises with the host.

    Example:
        >>> import torch
        >>> from collapse_monitor.stats import ClassMoments
        >>> m = ClassMoments(2)
        >>> m.update(torch.tensor([[0.0, 1.0], [2.0, 1.0], [5.0, 5.0]]), torch.tensor([0, 0, 1]))
        >>> m.means()
        tensor([[1., 1.],
                [5., 5.]], dtype=torch.float64)
        >>> m.class_variances()
        tensor([1., 0.], dtype=torch.float64)
    """

    def __init__(self, num_classes: int, dim: int | None = None, diagonal: bool = False) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = C = int(num_classes)
        self.diagonal = diagonal
        self.add_size("D", "feature dimension", dim)
        # reduced by all_reduce below (re-centred on the global means first), not state by state
        self.add_state("count", (C,), torch.int64, reduce=None)
        self.add_state("shift", (C, "D"), _F64, reduce=None)
        self.add_state("shift_set", (C,), torch.bool, reduce=None)
        self.add_state("shift_agreed", (C,), torch.bool, reduce=None)
        self.add_state("sum", (C, "D"), _F64, reduce=None)
        self.add_state("sq_norm", (C,), _F64, reduce=None)
        self.add_state("second_moment", ("D",) if diagonal else ("D", "D"), _F64, reduce=None)

    @property
    def dim(self) -> int | None:
        return self.sizes["D"]

    def reset(self) -> None:
        """Clear the window but keep the shifts (they are the next window's reference)."""
        for name in ("count", "sum", "sq_norm", "second_moment"):
            self._reset_state(name)

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(
        self, features: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None
    ) -> None:
        """Add a batch.

        Args:
            features: ``(N, D)`` floating, any dtype (accumulated in float64).
            labels: ``(N,)`` integer in ``[0, C)`` wherever ``valid`` is true.
            valid: ``(N,)`` bool; rows where it is false are ignored (their label and features
                may hold anything, NaN included).

        Raises:
            ValueError: ``D`` differs from the first update's.
        """
        x = features.detach().to(_F64)
        if self.count.device != x.device:
            self.to(x.device)
        self.fix_sizes(D=x.shape[1])
        if valid is None:
            valid = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        y = torch.where(valid, labels, 0)

        new = valid & ~self.shift_set[y]
        # on the CPU the check is free; elsewhere it would be a device sync, so always run it
        if x.device.type != "cpu" or bool(new.any()):
            self._set_new_shifts(torch.where(valid[:, None], x, 0.0), y, new)

        # one select masks invalid rows (NaN included: where() does not propagate them)
        z = torch.where(valid[:, None], x - self.shift[y], 0.0)
        self.count.index_add_(0, y, valid.to(torch.int64))
        self.sum.index_add_(0, y, z)
        self.sq_norm.index_add_(0, y, torch.linalg.vecdot(z, z))
        if self.diagonal:
            self.second_moment += (z * z).sum(0)
        else:
            # Full GEMM on purpose: upper-triangle blocks (half the multiply-adds) measured no
            # faster with MKL on 2 cores, and numpy's OpenBLAS syrk, 1.8x faster alone, tripled
            # an MLP's step time inside training (two BLAS thread pools fighting for the cores).
            self.second_moment.addmm_(z.T, z)

    def _set_new_shifts(self, x: torch.Tensor, y: torch.Tensor, new: torch.Tensor) -> None:
        """Classes seen for the first time get their batch mean as shift. Every row writes a
        value that depends on its class only, so duplicate indices cannot race."""
        newf = new.to(_F64)
        n_new = torch.zeros(self.num_classes, dtype=_F64, device=x.device).index_add_(0, y, newf)
        self.shift.index_add_(0, y, x * newf[:, None])
        denom = torch.where(n_new > 0, n_new, 1.0)
        self.shift.index_copy_(0, y, self.shift[y] / denom[y, None])
        self.shift_set |= n_new > 0

    # ------------------------------------------------------------------ exact re-centring
    def rebase(
        self,
        new_shift: torch.Tensor,
        rows: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
    ) -> None:
        """Re-express the sums around ``new_shift`` (C, D), or, with ``rows`` (R,) distinct
        class indices, those classes' sums around ``new_shift`` (R, D); exact algebra,
        O(R D^2). ``counts``: the samples behind those sums when not ``count``'s."""
        at = slice(None) if rows is None else rows
        n = (self.count[at] if counts is None else counts).to(_F64)
        s = self.sum[at]
        delta = self.shift[at] - new_shift
        if self.diagonal:
            self.second_moment += (delta * (s + n[:, None] * delta) + s * delta).sum(0)
        else:
            self.second_moment += delta.T @ (s + n[:, None] * delta) + s.T @ delta
        self.sq_norm[at] += 2 * (delta * s).sum(1) + n * (delta * delta).sum(1)
        self.sum[at] = s + n[:, None] * delta
        self.shift[at] = new_shift

    def merge(self, other: ClassMoments) -> ClassMoments:
        """Add another window's statistics (any shifts) into this one."""
        if not other.dim:
            return self
        self.fix_sizes(D=other.dim)
        other = other.clone().to(self.device)
        ref = torch.where(self.shift_set[:, None], self.shift, other.shift)
        # self has no samples where its shift is unset, so adopting other's shift is exact
        self.shift = ref
        other.rebase(ref)
        self.count += other.count
        self.sum += other.sum
        self.sq_norm += other.sq_norm
        self.second_moment += other.second_moment
        self.shift_set |= other.shift_set
        return self

    def _all_reduce_states(self, group) -> None:
        """SUM-reduce ``count``, ``sum``, ``sq_norm`` and ``second_moment``: one collective per
        state, no samples exchanged. Sums around agreed shifts (the same on every rank) add as
        they are; for the classes first seen in this window, whose shifts each rank took from
        its own batches, the ranks first agree on the global class means (SUM of counts and raw
        sums of those classes) and re-centre their sums there (exact). After the first window
        that is no class, and the readout's all-reduce costs no ``O(C D^2)`` work."""
        todo = torch.nonzero(~self.shift_agreed).squeeze(1)  # the same classes on every rank
        n_local = self.count[todo]
        raw_sum = self.sum[todo] + n_local.to(_F64)[:, None] * self.shift[todo]
        _dist.all_reduce_sum_(self.count, group)
        if todo.numel():
            _dist.all_reduce_sum_(raw_sum, group)
            n = self.count[todo].to(_F64)
            seen = n > 0
            ref = torch.where(
                seen[:, None], raw_sum / torch.where(seen, n, 1.0)[:, None], self.shift[todo]
            )
            # each rank re-centres its own samples; a class it did not see has zero sums, so
            # only its shift moves (on a large vocabulary each rank sees part of the classes)
            mine = n_local > 0
            self.rebase(ref[mine], todo[mine], n_local[mine])
            self.shift[todo] = ref
        for name in ("sum", "sq_norm", "second_moment"):
            _dist.all_reduce_sum_(getattr(self, name), group)
        self.shift_set |= self.count > 0
        self.shift_agreed = self.shift_set.clone()  # a checkpoint of this state loads agreed

    def load_state_dict(self, state: dict) -> None:
        states = state["states"]
        if "shift_agreed" not in states:  # saved before agreed shifts: re-centre all (exact)
            states = {**states, "shift_agreed": torch.zeros_like(states["shift_set"])}
        super().load_state_dict({**state, "states": states})

    # ------------------------------------------------------------------ readout
    def means(self) -> torch.Tensor:
        """Class means ``(C, D)``; rows of unseen classes are zero."""
        n = self.count.to(_F64)
        seen = n > 0
        return torch.where(
            seen[:, None], self.shift + self.sum / torch.where(seen, n, 1.0)[:, None], 0.0
        )

    def within_class_scatter(self, share: tuple[int, int] = (0, 1), combine=None) -> torch.Tensor:
        """``sum_c sum_{i in c} (h_i - mu_c)(h_i - mu_c)'`` as ``(D, D)`` float64 (its diagonal
        ``(D,)`` for a diagonal statistic).

        Args:
            share: ``(rank, world)``: compute the ``O(C D^2)`` class term over this rank's
                ``1/world`` of the classes only; ``combine`` must then sum it over the ranks in
                place (an all-reduce of ``D x D``), and every rank gets the whole scatter.
        """
        n = self.count.to(_F64)
        seen = n > 0
        rows = share_rows(self.num_classes, share)
        scaled = self.sum[rows] / torch.where(seen[rows], n[rows], 1.0).sqrt()[:, None]
        between = (scaled * scaled).sum(0) if self.diagonal else scaled.T @ scaled
        if share[1] > 1:
            combine(between)
        if self.diagonal:
            return (self.second_moment - between).clamp_min(0.0)
        scatter = self.second_moment - between
        return (scatter + scatter.T) / 2

    def class_variances(self) -> torch.Tensor:
        """``Var_c = (1/n_c) sum_{i in c} ||h_i - mu_c||^2`` as ``(C,)``; 0 for unseen classes."""
        n = self.count.to(_F64)
        seen = n > 0
        safe = torch.where(seen, n, 1.0)
        var = self.sq_norm / safe - (self.sum * self.sum).sum(1) / (safe * safe)
        return torch.where(seen, var.clamp_min(0.0), 0.0)

    def end_window(self, reduced: ClassMoments | None = None) -> None:
        """Start a new window: shifts become the window's class means, sums are cleared.

        Args:
            reduced: the all-reduced window (identical on every rank) whose means become the
                shifts; defaults to this statistic (single process).
        """
        reduced = self if reduced is None else reduced
        if reduced.dim is not None:  # a rank that saw nothing: fixed now, or its first update
            self.fix_sizes(D=reduced.dim)  # would reallocate the agreed shifts as zeros
        seen = reduced.count > 0
        self.shift = torch.where(seen[:, None], reduced.means(), reduced.shift).to(self.device)
        self.shift_set = reduced.shift_set.to(self.device) | seen.to(self.device)
        self.shift_agreed = self.shift_set.clone()
        self.reset()


class Moments(ClassMoments):
    """Streaming count, mean and (shifted, float64) second moment of one population of vectors:
    the covariance of embeddings, the spread of posterior means. The one-class case of
    :class:`ClassMoments`, with the same exact re-centring under DDP.

    Args:
        dim: ``D``, or ``None`` to take it from the first update.
        diagonal: keep only the per-coordinate second moment (``8*D`` bytes instead of ``8*D^2``).

    Example:
        >>> import torch
        >>> from collapse_monitor.stats import Moments
        >>> m = Moments()
        >>> m.update(torch.tensor([[1.0, 0.0], [3.0, 0.0]]))
        >>> m.mean(), m.scatter()
        (tensor([2., 0.], dtype=torch.float64), tensor([[2., 0.],
                [0., 0.]], dtype=torch.float64))
    """

    def __init__(self, dim: int | None = None, diagonal: bool = False) -> None:
        super().__init__(1, dim, diagonal)

    def update(self, features: torch.Tensor, valid: torch.Tensor | None = None) -> None:  # type: ignore[override]
        """Add ``features (N, D)``; rows where ``valid (N,)`` is false are ignored."""
        zeros = torch.zeros(features.shape[0], dtype=torch.int64, device=features.device)
        super().update(features, zeros, valid)

    @property
    def n(self) -> int:
        """Samples seen (a host sync)."""
        return int(self.count[0])

    def mean(self) -> torch.Tensor:
        """``(D,)`` float64."""
        return self.means()[0]

    def scatter(self) -> torch.Tensor:
        """``sum_i (z_i - mean)(z_i - mean)'``: ``(D, D)``, or its diagonal ``(D,)``."""
        return self.within_class_scatter()
