"""Per-class feature moments for neural-collapse metrics (docs/metrics.md#neuralcollapse).

Power sums are accumulated around a per-class shift ``K_c`` so that the readout
``Sigma_W = (S - sum_c s_c s_c' / n_c) / N`` does not cancel catastrophically when the within-class
variance is tiny compared with the class means (the collapsed regime this monitor exists to see).
``K_c`` is the class's mean in the first batch it appears in, and the previous window's mean
afterwards, so the cancellation factor is ``||mu_c - K_c||^2 / lambda`` ~ O(1) instead of
``||mu_c||^2 / lambda``. The readout formulas are exact for any shift; the shift only buys digits.
"""

from __future__ import annotations

import functools
import logging

import torch

from .. import _dist
from ..functional import _precision
from ..functional.neural_collapse import share_rows
from .base import Statistic

_F64 = torch.float64
log = logging.getLogger(__name__)
_BY_CLASS = ("count", "shift", "shift_set", "shift_agreed", "sum", "sq_norm")  # (C, ...) states
_ALL = (0, 1)  # the "shard" of a state that holds all classes (:func:`whole_classes`)
_WIRE = (torch.bfloat16, torch.float16, torch.float32, torch.float64)  # dtypes rows travel in


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

    ``matmul_dtype``: the dtype of each batch's GEMM ``Z'Z``; ``None`` picks float64 on the CPU
    and on data-centre GPUs, IEEE float32 on GPUs whose float64 is slow (its rounding bound:
    ``collapse_monitor.functional._precision.add_gram_``). Either way the window's states are float64.

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

    #: class shards (:class:`ShardedClassMoments`) keep each class on one rank: nothing is
    #: combined across ranks
    class_sharded = False

    def __init__(
        self,
        num_classes: int,
        dim: int | None = None,
        diagonal: bool = False,
        matmul_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = C = int(num_classes)
        self.diagonal = diagonal
        self.matmul_dtype = _precision.check_matmul_dtype(matmul_dtype)
        self.add_size("D", "feature dimension", dim)
        # sums add over ranks once :meth:`align` has put every rank's around the same shifts
        summed, agreed = ("local", "local") if self.class_sharded else ("sum", "same")
        self.add_state("count", (C,), torch.int64, reduce=summed)
        self.add_state("shift", (C, "D"), _F64, reduce=agreed)
        self.add_state("shift_set", (C,), torch.bool, reduce=agreed)
        self.add_state("shift_agreed", (C,), torch.bool, reduce=agreed)
        self.add_state("sum", (C, "D"), _F64, reduce=summed)
        self.add_state("sq_norm", (C,), _F64, reduce=summed)
        self.add_state("second_moment", ("D",) if diagonal else ("D", "D"), _F64, reduce=summed)

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
            dtype = _precision.matmul_dtype(self.matmul_dtype, z.device)
            _precision.add_gram_(self.second_moment, z, dtype)

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

    def align(self, group) -> None:
        """Put every rank's sums around the same shifts, so that they add. Sums around agreed
        shifts (the same on every rank) add as they are; for the classes first seen in this
        window, whose shifts each rank took from its own batches, the ranks agree on the global
        class means (one SUM of those classes' counts and raw sums) and re-centre their sums
        there (exact). After the first window that is no class, and a reduce costs no
        ``O(C D^2)`` work. Afterwards ``shift``, ``shift_set`` and ``shift_agreed`` are the same
        on every rank."""
        todo = torch.nonzero(~self.shift_agreed).squeeze(1)  # the same classes on every rank
        if todo.numel():
            n_local = self.count[todo]
            raw = torch.cat(
                [
                    n_local.to(_F64)[:, None],
                    self.sum[todo] + n_local.to(_F64)[:, None] * self.shift[todo],
                ],
                1,
            )
            _dist.all_reduce_sum_(raw, group)
            n, raw_sum = raw[:, 0], raw[:, 1:]
            seen = n > 0
            ref = torch.where(
                seen[:, None], raw_sum / torch.where(seen, n, 1.0)[:, None], self.shift[todo]
            )
            # each rank re-centres its own samples; a class it did not see has zero sums, so
            # only its shift moves (on a large vocabulary each rank sees part of the classes)
            mine = n_local > 0
            self.rebase(ref[mine], todo[mine], n_local[mine])
            self.shift[todo] = ref
            self.shift_set[todo] |= seen
        self.shift_agreed = self.shift_set.clone()  # a checkpoint of this state loads agreed

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`, or all classes of a class-sharded run
        (:func:`whole_classes`: a gathered checkpoint of another world size).

        Raises:
            ValueError: a state of one rank's class shard (:class:`ShardedClassMoments`),
                which these statistics of all classes cannot use.
        """
        if "shard" in state and not self.class_sharded:
            if tuple(state["shard"]) == _ALL:
                return self._load_whole(state)
            rank, world = state["shard"]
            raise ValueError(
                f"the checkpoint holds class shards (the classes of rank {rank} of {world}), "
                "this probe keeps all classes (shard_classes=False, or one process): resume "
                f"with shard_classes=True on {world} ranks, or at another world size from a "
                "state of every rank (monitor.state_dict(gather=True), or monitor.stateful())"
            )
        states = state["states"]
        if "shift_agreed" not in states:  # saved before agreed shifts: re-centre all (exact)
            states = {**states, "shift_agreed": torch.zeros_like(states["shift_set"])}
        super().load_state_dict({**state, "states": states})

    def _load_whole(self, state: dict) -> None:
        """All classes of a class-sharded run (:func:`whole_classes`): its states, then the rows
        its ranks had not routed yet (every rank loads the same, so the shifts agree)."""
        states = dict(state["states"])
        lost = bool(states.pop("lost").item())
        states["shift_agreed"] = states["shift_set"].clone()
        super().load_state_dict({"sizes": state["sizes"], "states": states})
        if lost:  # (its shifts stay)
            log.warning(
                "collapse monitor: the saved class-sharded window lacks samples an earlier resume "
                "dropped: the current window starts empty"
            )
            self.reset()
            return
        for x, y, valid in state["pending"]:
            self.update(x, y, valid)

    # ------------------------------------------------------------------ readout
    def means(self) -> torch.Tensor:
        """Class means ``(C, D)``; rows of unseen classes are zero."""
        n = self.count.to(_F64)
        seen = n > 0
        return torch.where(
            seen[:, None], self.shift + self.sum / torch.where(seen, n, 1.0)[:, None], 0.0
        )

    def within_class_scatter(self) -> torch.Tensor:
        """``sum_c sum_{i in c} (h_i - mu_c)(h_i - mu_c)'`` as ``(D, D)`` float64, symmetric up to
        rounding (its diagonal ``(D,)`` for a diagonal statistic), over this statistic's
        classes."""
        return self.scatter_from(self.between_class_term())

    def between_class_term(self, rows: slice = slice(None)) -> torch.Tensor:
        """``sum_c s_c s_c' / n_c`` over the classes ``rows`` (``(D, D)``, or its diagonal):
        what the scatter around the class means takes from ``S``. Parts over disjoint rows add
        up (``O(C D^2)``: a readout may split it over ranks)."""
        n = self.count.to(_F64)
        scaled = self.sum[rows] / torch.where(n[rows] > 0, n[rows], 1.0).sqrt()[:, None]
        return (scaled * scaled).sum(0) if self.diagonal else scaled.T @ scaled

    def scatter_from(self, between: torch.Tensor) -> torch.Tensor:
        """The within-class scatter ``S - between`` (:meth:`between_class_term` of all
        classes); a diagonal one clamped at 0 (rounding). A full one is symmetric up to
        rounding, not made exactly so: its readers take traces, quadratic forms, or one
        triangle (``eigvalsh`` of a covariance), and the ``D x D`` transposed pass cost 1-2 ms
        of an MLP's 6 ms readout on a 2-core CPU."""
        scatter = self.second_moment - between
        return scatter.clamp_min(0.0) if self.diagonal else scatter

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


class ShardedClassMoments(ClassMoments):
    """:class:`ClassMoments` of the classes this rank owns: class-sharded statistics under
    ``torch.distributed``.

    Rank ``r`` of ``world`` owns the contiguous classes ``[C r / world, C (r + 1) / world)``
    (:func:`~collapse_monitor.functional.neural_collapse.share_rows`) and keeps their counts,
    shifts and sums, ``16 C D / world`` bytes, and its own part of the pooled second moment
    ``S`` (``8 D^2``): its :meth:`within_class_scatter` is its classes' part of the pooled
    scatter, which a readout sums over the ranks.
    :meth:`update` only buffers a batch's rows; :meth:`flush` (a collective, at the end of
    every recorded step and before a reduce) routes each valid row to its class's owner (one
    ``all_gather`` of row counts, two ``all_to_all_single``) where it is added. Each class then
    lives on one rank, so the shifts need no agreement and no re-centring; the readout
    (:func:`~collapse_monitor.stats.class_readout.sharded_class_metrics`) is computed by the owners
    together.

    Rows travel in the features' dtype (promoted when ranks differ; a rank's own rows stay),
    and the owner accumulates them in float64 like one process does. The buffer holds a copy of
    every row recorded in the step (all micro-batches; a validation snapshot's rows until it
    ends): ``rows x D`` in the features' dtype, and about three more while :meth:`flush` runs.

    Args:
        num_classes: ``C`` (all classes); rank, world: this rank and the group's size;
        matmul_dtype: as for :class:`ClassMoments`.

    Raises:
        ValueError: ranks with different feature sizes (in :meth:`flush`, on every rank alike),
            or a rank's own batches that differ (in :meth:`update`).
    """

    class_sharded = True

    def __init__(
        self, num_classes: int, rank: int, world: int, matmul_dtype: torch.dtype | None = None
    ) -> None:
        if not 0 <= rank < world <= num_classes:
            raise ValueError(
                f"class shards need 0 <= rank < world <= num_classes, got {rank}, {world}, "
                f"{num_classes}"
            )
        block = share_rows(int(num_classes), (rank, world))
        super().__init__(block.stop - block.start, matmul_dtype=matmul_dtype)
        self.total_classes, self.first, self.shard = int(num_classes), block.start, (rank, world)
        # stops of every rank's block: a label's owner is the number of stops <= it
        self._stops = torch.tensor(
            [share_rows(self.total_classes, (r, world)).stop for r in range(world)]
        )
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self.routed: int | None = None  # valid rows of all ranks in the last flush
        # 1 when this window lacks samples another rank's checkpoint held (max over ranks)
        self.add_state("lost", (1,), torch.int64, reduce="max")

    @property
    def incomplete(self) -> bool:
        """The window lacks samples recorded before a resume (a host sync)."""
        return bool(self.lost.item())

    def reset(self) -> None:
        super().reset()
        self._reset_state("lost")

    def update(
        self, features: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None
    ) -> None:
        """Buffer a batch (global labels in ``[0, C)`` where ``valid``) until :meth:`flush`.

        Raises:
            ValueError: ``D`` differs from an earlier batch's (here, before any collective).
        """
        dims = {features.shape[-1], *(p[0].shape[-1] for p in self._pending[:1])}
        if self.dim is not None:
            dims.add(self.dim)
        if len(dims) > 1:
            raise ValueError(f"feature dimension changed: {sorted(dims)}")
        keep = None if valid is None else valid.detach().clone()
        self._pending.append((features.detach().clone(), labels.detach().clone(), keep))

    @torch.no_grad()
    def flush(self, group=None) -> int:
        """Route the buffered rows to their classes' owners and add the rows this rank owns.
        A collective: every rank calls it, buffered rows or not.

        Returns:
            the valid rows buffered over all ranks.
        """
        world = self.shard[1]
        if _dist.world_size(group) != world or _dist.rank(group) != self.shard[0]:
            raise RuntimeError(
                f"class shards were made for rank {self.shard[0]} of {world}; this process is "
                f"rank {_dist.rank(group)} of {_dist.world_size(group)}"
            )
        pending, self._pending, self.routed = self._pending, [], None
        device = pending[0][0].device if pending else self.device
        wire = _dist.collective_device(group, device)
        if pending:
            dtype = functools.reduce(torch.promote_types, [p[0].dtype for p in pending])
            dtype = dtype if dtype in _WIRE else _F64
            x = torch.cat([p[0].reshape(-1, p[0].shape[-1]).to(dtype) for p in pending])
            y = torch.cat([p[1].reshape(-1) for p in pending]).to(torch.int64)
            ok = torch.cat(
                [torch.ones_like(p[1], dtype=torch.bool) if p[2] is None else p[2] for p in pending]
            ).reshape(-1)
            if self._stops.device != y.device:
                self._stops = self._stops.to(y.device)
            owner = torch.where(
                ok, torch.searchsorted(self._stops, torch.where(ok, y, 0), right=True), world
            )
            dim, code = x.shape[1], _WIRE.index(dtype) + 1
        else:
            owner = torch.zeros(0, dtype=torch.int64, device=device)
            dim, code = self.dim or 0, 0
        # rows per destination, then D and the dtype (no bincount: it would read the max)
        header = torch.zeros(world + 3, dtype=torch.int64, device=owner.device)
        header.index_add_(0, owner, torch.ones_like(owner))
        header[world], header[world + 1] = dim, code
        header = header[: world + 2]
        table = torch.stack(_dist.all_gather_rows(header.to(wire), [world + 2] * world, group))
        table = table.cpu()  # a host sync: the split sizes of the exchange
        total = self.routed = int(table[:, :world].sum())
        dims = set(table[:, world].tolist()) - {0}
        if len(dims) > 1:
            raise ValueError(f"ranks disagree on the feature dimension: {sorted(dims)}")
        if not total:
            return 0
        # the features' own dtype (promoted when ranks differ): the owner's float64 upcast
        # is then that of one process
        codes = set(table[:, world + 1].tolist()) - {0}
        dtype = functools.reduce(torch.promote_types, [_WIRE[c - 1] for c in codes])
        me, D = self.shard[0], dims.pop()
        sends, receives = table[me, :world].tolist(), table[:, me].tolist()
        if pending:
            order = torch.argsort(owner, stable=True)[: sum(sends)]
            xs, ys = x[order].to(dtype), y[order]
        else:
            xs, ys = torch.zeros(0, D, dtype=dtype), torch.zeros(0, dtype=torch.int64)
        # this rank's own rows stay here; the others travel
        a, b = sum(sends[:me]), sum(sends[: me + 1])
        keep_x, keep_y = xs[a:b], ys[a:b]
        sends[me] = receives[me] = 0
        xs, ys = torch.cat([xs[:a], xs[b:]]).to(wire), torch.cat([ys[:a], ys[b:]]).to(wire)
        xr = xs.new_empty((sum(receives), D))
        yr = ys.new_empty(sum(receives))
        torch.distributed.all_to_all_single(xr, xs, receives, sends, group=group)
        torch.distributed.all_to_all_single(yr, ys, receives, sends, group=group)
        x_all = torch.cat([keep_x.to(self.device), xr.to(self.device)])
        y_all = torch.cat([keep_y.to(self.device), yr.to(self.device)])
        if y_all.numel():
            super().update(x_all, y_all - self.first)
        else:
            self.fix_sizes(D=D)
        return total

    def forget_reduced(self) -> None:
        """Nothing: every rank keeps its own classes (and ``lost``, set by this very load)."""

    def align(self, group) -> None:
        """Nothing: each class lives on its owner, around the owner's shifts (``S`` stays each
        rank's own part until a readout sums the parts; rows reach their owners in
        :meth:`flush`, which :meth:`Window.reduced` runs first)."""

    def clone(self) -> ShardedClassMoments:
        new = super().clone()
        new._pending = list(self._pending)
        return new

    def to(self, device: torch.device | str) -> ShardedClassMoments:
        super().to(device)
        self._pending = [tuple(t if t is None else t.to(device) for t in p) for p in self._pending]
        return self

    def merge(self, other: ClassMoments) -> ClassMoments:
        raise TypeError("class shards do not merge: flush() routes rows to their owners")

    def state_dict(self) -> dict:
        """This rank's classes (with ``S``, reduced or not) and the rows not yet routed: save
        every rank's (its own file, or all in one: :func:`~collapse_monitor.state.gathered`)."""
        return {
            **super().state_dict(),
            "shard": self.shard,
            "pending": [tuple(None if t is None else t.cpu() for t in p) for p in self._pending],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` of the same rank and world, or take this rank's classes
        from all classes' state (:func:`whole_classes`: a gathered checkpoint of another world
        size). A state of another rank's classes (rank 0's alone) or of an unsharded run
        cannot be used: this rank starts empty and marks the window :attr:`incomplete`, so
        that its readout is skipped on every rank, and logs a warning; the windows after it
        are whole."""
        saved = tuple(state.get("shard", ()))
        if saved == _ALL:
            state = self._own_classes(state)
        elif saved != self.shard:
            log.warning(
                "collapse monitor: the saved class-sharded statistics are those of shard %s "
                "(rank, world), this process owns %s: the current window is dropped (each rank "
                "must load its own state, one file per rank, or a gathered state of every rank: "
                "monitor.state_dict(gather=True), or monitor.stateful())",
                saved or "(none: saved unsharded)",
                self.shard,
            )
            for name in self.state_names:
                self._reset_state(name)
            self._pending = []
            self.lost.fill_(1)
            return
        super().load_state_dict(state)
        self._pending = [
            tuple(None if t is None else t.to(self.device) for t in p) for p in state["pending"]
        ]

    def _own_classes(self, state: dict) -> dict:
        """This rank's part of all classes' state (:func:`whole_classes`): its classes' rows;
        the pooled second moment and the rows not routed yet go to rank 0 (a readout sums the
        ranks' second moments; :meth:`flush` routes the rows to their owners)."""
        rows = slice(self.first, self.first + self.num_classes)
        first = self.shard[0] == 0
        states = {n: t[rows] for n, t in state["states"].items() if n in _BY_CLASS}
        moment, lost = state["states"]["second_moment"], state["states"]["lost"]
        states.update(second_moment=moment if first else torch.zeros_like(moment), lost=lost)
        return {**state, "states": states, "pending": state["pending"] if first else []}


class Moments(ClassMoments):
    """Streaming count, mean and (shifted, float64) second moment of one population of vectors:
    the covariance of embeddings, the spread of posterior means. The one-class case of
    :class:`ClassMoments`, with the same exact re-centring under DDP.

    Args:
        dim: ``D``, or ``None`` to take it from the first update.
        diagonal: keep only the per-coordinate second moment (``8*D`` bytes instead of ``8*D^2``).
        matmul_dtype: as for :class:`ClassMoments`.

    Example:
        >>> import torch
        >>> from collapse_monitor.stats import Moments
        >>> m = Moments()
        >>> m.update(torch.tensor([[1.0, 0.0], [3.0, 0.0]]))
        >>> m.mean(), m.scatter()
        (tensor([2., 0.], dtype=torch.float64), tensor([[2., 0.],
                [0., 0.]], dtype=torch.float64))
    """

    def __init__(
        self,
        dim: int | None = None,
        diagonal: bool = False,
        matmul_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(1, dim, diagonal, matmul_dtype)

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


def whole_classes(parts: list[dict]) -> dict:
    """All classes' state from every rank's :meth:`ShardedClassMoments.state_dict` (in rank
    order): counts, shifts and sums of each rank's classes joined in class order, the ranks'
    parts of the pooled second moment summed, their rows not routed yet together, ``lost`` if
    any rank lost samples. It is the state of rank 0 of 1 (``"shard": (0, 1)``), which a
    :class:`ShardedClassMoments` of any world size takes its classes from, and a
    :class:`ClassMoments` (one process, or replicated) loads whole: a class-sharded checkpoint
    re-sharded, exactly, to another world size.

    Raises:
        ValueError: ``parts`` are not the shards ``(0, W) .. (W-1, W)`` of one run, or their
            feature dimensions differ.
    """
    world = len(parts)
    shards = [tuple(p["shard"]) for p in parts]
    if shards != [(r, world) for r in range(world)]:
        raise ValueError(f"not the class shards of one run of {world} ranks: {shards}")
    # (every rank fixes D at the first flush that routed rows anywhere: all or none have it)
    dims = [p["sizes"]["D"] for p in parts]
    if len(set(dims)) > 1:
        raise ValueError(f"class shards of different feature dimensions: {dims}")
    states = {
        n: torch.cat([p["states"][n] for p in parts]) for n in _BY_CLASS if n in parts[0]["states"]
    }
    states["second_moment"] = sum(p["states"]["second_moment"] for p in parts)
    states["lost"] = torch.stack([p["states"]["lost"] for p in parts]).amax(0)
    pending = [rows for p in parts for rows in p["pending"]]
    return {"sizes": dict(parts[0]["sizes"]), "states": states, "shard": _ALL, "pending": pending}
