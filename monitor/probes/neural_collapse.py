"""Neural-collapse probe (Papyan, Han & Donoho 2020), docs/metrics.md#neuralcollapse."""

from __future__ import annotations

import logging

import torch
from torch import nn

from .. import _dist
from .._adapters import applied, effective_weight, is_linear, linear_parts
from .._modules import named_modules, resolve_modules
from .._sharding import is_partitioned, is_sharded, shape_of
from ..cadence import per_class
from ..contracts import Readout
from ..functional import _precision
from ..functional.neural_collapse import (
    group_variance_ratio,
    nearest_class_center,
    nearest_class_center_mismatch,
)
from ..pictures import Picture
from ..reading import (
    Call,
    Reading,
    aligned_targets,
    feature_rows,
    finite_rows,
    floating,
    label_index,
    label_shift,
)
from ..rules import RuleSpec
from ..stats import ClassMoments, Counter, ShardedClassMoments, Window
from ..stats.class_readout import class_moment_metrics
from .base import Probe

log = logging.getLogger(__name__)

_F64 = torch.float64
_COUNTERS = ("skipped_nonfinite", "out_of_range", "ncc_mismatch", "ncc_total")


class NeuralCollapse(Probe):
    """NC1-NC4 and CDNV of the features entering (or leaving) a module, per window.

    Features are the module's input by default (``read="input"``: the penultimate features of a
    classifier head), or its output (``read="output"``). Class labels come from
    ``monitor.observe(targets=...)``.

    Args:
        module: path of the module, e.g. ``"head"``; must select exactly one module.
        num_classes: ``C``.
        read: ``"input"`` or ``"output"``.
        classifier: path of the ``nn.Linear`` whose ``weight (C, D)`` and ``bias (C,)`` are
            ``W`` and ``b``; defaults to ``module`` itself when it is an ``nn.Linear`` read at
            its input. Without a classifier, ``equinorm_weights``, ``self_duality`` and NC4 are
            not reported.
        ignore_index: target value that is skipped (padding in language models).
        target_shift: ``s > 0`` pairs ``features[..., :-s, :]`` with ``targets[..., s:]``
            (hidden state at position t, next-token label); default: 1 inside a
            ``transformers`` causal LM (which takes unshifted ``labels``), else 0
            (:func:`~collapse_monitor.reading.label_shift`).
        min_class_count: classes with fewer samples in a window are left out (and counted).
        ncc_max_rows: rows per forward call used for the lagged NC4 (the first ones); 0 turns
            NC4 off. Cost per call is ``rows x C x D`` multiply-adds.
        tile_size: tile of the pairwise metrics at log time.
        pair_sample: when the classes used in a window have more pairs than this, the
            pairwise metrics (``equiangular``, ``cos_std``, ``cdnv``) are estimated on this many
            random class pairs, reported as ``*_sampled`` with the half width of a 95% interval
            ``*_sampled_ci95`` (:func:`~collapse_monitor.functional.sampled_pairwise_metrics`):
            for heads of ~10^5 classes whose exact readout (``C^2/2`` pairs) is too slow.
            ``None`` (default): exact.
        shard_classes: under ``torch.distributed`` (initialised before the monitor is made),
            each rank keeps and reads out only ``1/world`` of the classes
            (:class:`~collapse_monitor.stats.ShardedClassMoments`): state ``16*C*D/world +
            8*D^2`` bytes per rank, and at the end of every recorded step each rank sends
            its rows to their classes' owners (an all-to-all of the step's rows; on a GPU one
            host sync for its sizes). The metrics are those of one process. Every rank saves
            and loads its own state (one file per rank, as the Hugging Face ``Trainer``
            callback writes; from a checkpoint of one rank's state only, as Lightning or
            ``torch.distributed.checkpoint`` write, the resumed window is skipped with a
            warning);
            ``ncc_mismatch_lagged`` is not reported (it needs every class mean on every rank)
            and ``pair_sample`` is not available. For language-model heads (``C`` ~ 10^5).
        matmul_dtype: the dtype of the GEMMs of a recorded step (the features' Gram, NC4's
            distances): ``None`` (default) float64 on the CPU and on GPUs with fast float64
            (P100, V100, A100, H100, H200, B200), IEEE float32 on the others, where float64
            runs at 1/32 to 1/64 of the float32 rate. The statistics stay float64 either way
            (docs/metrics.md#precision: the bound float32 keeps).

    Accepts features ``(N, D)`` with targets ``(N,)``, or ``(B, T, D)`` with ``(B, T)``.
    Reports ``collapse/<name>/{nc1, nc1_rank, nc1_quotient, equinorm_features,
    equinorm_weights, equiangular, cos_std, self_duality, cdnv, cdnv_pairs_skipped,
    ncc_mismatch_lagged, classes_used, samples, skipped_nonfinite}``. Under
    ``torch.distributed`` each rank computes ``1/world`` of the exact class pairs and the ranks
    sum them (the readout's ``O(C^2 D)`` time splits; the numbers are those of one process).
    Rows with NaN/Inf features are excluded and counted. ``ncc_mismatch_lagged`` compares the network's prediction with the
    nearest of the previous window's class means, over rows of the classes that window used
    (so it equals :func:`~collapse_monitor.functional.neural_collapse`'s ``ncc_mismatch`` when
    two windows see the same data); it needs the classifier's weight in the probed forward,
    so under FSDP2 a classifier that is not the probed module and is sharded at that moment,
    and under DeepSpeed ZeRO-3 any classifier not read at its input, gives no
    ``ncc_mismatch_lagged`` (the probed head itself is unsharded in its forward). State:
    ``16*C*D + 8*D^2`` bytes (float64), on the module's device.

    Raises:
        ValueError: (at the hook) targets that do not match the features, or a feature
            dimension that changes; labels outside ``[0, C)`` only under a ``strict`` monitor
            (otherwise their rows are left out and counted in ``out_of_range``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from collapse_monitor import CollapseMonitor, probes
        >>> head = nn.Linear(3, 3)
        >>> mon = CollapseMonitor(nn.Sequential(head), [probes.NeuralCollapse("0", 3, name="nc")], 1)
        >>> y = torch.arange(30) % 3
        >>> with mon.observe(targets=y):  # features = their class's one-hot: collapsed
        ...     _ = mon.model(torch.eye(3)[y])
        >>> round(mon.step()["collapse/nc/nc1"], 12)
        0.0
        >>> mon.close()
    """

    headline = ("nc1",)
    # label_shift: a checkpoint whose labels were paired otherwise is another probe
    described = ("num_classes", "label_shift")
    bad_input = ("out_of_range",)

    reads = Reading(
        "floating-point features (N, D) or (B, T, D)", floating(2), hint="features (N, D)"
    )
    keywords = {"targets": True}
    target_key = "targets"  # the observe() keyword holding the labels
    ncc = True  # NC4 against a classifier

    def __init__(
        self,
        module: str,
        num_classes: int,
        read: str = "input",
        classifier: str | None = None,
        ignore_index: int = -100,
        target_shift: int | None = None,
        min_class_count: int = 2,
        ncc_max_rows: int = 1024,
        tile_size: int = 256,
        pair_sample: int | None = None,
        shard_classes: bool = False,
        matmul_dtype: torch.dtype | None = None,
        name: str | None = None,
        extract=None,
    ) -> None:
        super().__init__(module, name, extract, read)
        self.matmul_dtype = _precision.check_matmul_dtype(matmul_dtype)
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if (target_shift or 0) < 0 or min_class_count < 1 or ncc_max_rows < 0 or tile_size < 1:
            raise ValueError(
                "expected target_shift >= 0, min_class_count >= 1, ncc_max_rows >= 0, "
                f"tile_size >= 1; got {target_shift}, {min_class_count}, {ncc_max_rows}, {tile_size}"
            )
        self.num_classes = int(num_classes)
        self.sampling = per_class(self.num_classes)
        self.classifier_path = classifier
        self.ignore_index = label_index(ignore_index)
        self.target_shift = target_shift
        self.label_shift = 0  # resolved at attach (a causal LM's labels: 1)
        self.min_class_count = int(min_class_count)
        self.ncc_max_rows = int(ncc_max_rows) if self.ncc else 0
        self.tile_size = int(tile_size)
        if pair_sample is not None and int(pair_sample) < 2:
            raise ValueError(f"pair_sample must be None or >= 2, got {pair_sample}")
        self.pair_sample = None if pair_sample is None else int(pair_sample)
        if shard_classes and pair_sample is not None:
            raise ValueError("pair_sample is not available with shard_classes=True")
        self.shard_classes = bool(shard_classes)
        self._shards: tuple[int, int] | None = None  # (rank, world) once attached with shards
        self._agreed_rows: int | None = None  # rows per step, the same on every rank
        self.classifier: nn.Module | None = None  # an nn.Linear or a PEFT LoRA Linear
        # a tensor-parallel classifier: its logits gathered, or NC4 left out (set at attach)
        self._sliced_logits = self._gathers_logits = False
        self._applied: tuple | None = None  # (parameter versions, W, b) of the classifier
        # lagged NC4: the classes the last window used, their means and squared norms
        self._lag: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # ----------------------------------------------------------------- wiring
    def on_attach(self, setup, found) -> None:
        if len(found) != 1:
            raise ValueError(
                f"{self!r}: needs exactly one module, '{self.module}' matched "
                f"{[n for n, _ in found]}"
            )
        mod = found[0][1]
        self.label_shift = label_shift(
            setup.model, [found[0][0]], self.target_shift, repr(self), self.target_key
        )
        group = setup.process_group
        world = _dist.world_size(group)
        if self.shard_classes and setup.tensor_parallel is not None:
            raise ValueError(
                f"{self!r}: class shards under tensor parallelism are not supported (the ranks "
                "of a tensor-parallel group see one batch): leave shard_classes off"
            )
        if self.shard_classes and world > self.num_classes:
            log.warning(
                "%r: %d classes cannot be sharded over %d ranks: statistics are replicated",
                self,
                self.num_classes,
                world,
            )
        elif self.shard_classes and world > 1:
            self._shards = (_dist.rank(group), world)
        if self.classifier_path is not None:
            cls = resolve_modules(setup.model, self.classifier_path, owner=repr(self))
            if len(cls) != 1 or not is_linear(cls[0][1]):
                raise TypeError(
                    f"{self!r}: classifier '{self.classifier_path}' must be one nn.Linear (or "
                    f"PEFT LoRA Linear), got {[(n, type(m).__name__) for n, m in cls]}"
                )
            self.classifier = cls[0][1]
        elif self.read == "input" and is_linear(mod) and self.ncc:
            self.classifier = mod
        self._sliced_logits = self._gathers_logits = False
        if self.classifier is not None and setup.tensor_parallel is not None:
            # a vocabulary-parallel classifier: each rank holds a slice of its logits and
            # weight in the forward. The probed classifier's logits are gathered with the
            # features (the driver's gather, NC4 from their argmax); a classifier elsewhere
            # would need its weight whole in another module's forward: NC4 is left out there
            path = next(p for p, m in named_modules(setup.model).items() if m is self.classifier)
            sliced = setup.tensor_parallel.sharded_dim(path) is not None
            own = self.classifier is mod and self.read == "input" and self.extract is None
            self._gathers_logits = sliced and own
            self._sliced_logits = sliced and not own
            if self._sliced_logits:
                log.warning(
                    "%r: the classifier '%s' is tensor-parallel: NC4 (ncc_mismatch_lagged) is "
                    "not computed",
                    self,
                    path,
                )
        if self.classifier is not None:  # (an adapter whose map it cannot read: refused now)
            shape = shape_of(linear_parts(self.classifier, f"{self!r}: classifier")[0])
            if shape[0] != self.num_classes:
                raise ValueError(
                    f"{self!r}: classifier weight has shape {shape} but "
                    f"num_classes={self.num_classes}"
                )

    def new_window(self) -> Window:
        if self._shards is None:
            moments = ClassMoments(self.num_classes, matmul_dtype=self.matmul_dtype)
        else:
            moments = ShardedClassMoments(self.num_classes, *self._shards, self.matmul_dtype)
        return Window({"moments": moments, "counts": Counter(_COUNTERS)})

    @property
    def rank_local(self) -> bool:
        return self._shards is not None

    @property
    def whole_output(self) -> bool:
        # a vocabulary-parallel head's logits, for NC4: only once a window has given the
        # lagged centres (the same on every rank of the group: reduced statistics)
        return self._gathers_logits and self._lag is not None

    def exchange(self, window, group) -> int | None:
        """Class shards: route this step's rows to their classes' owners, and take the same
        rows per step on every rank (so that every rank records the same steps)."""
        if not self.rank_local:
            return None
        moments = window["moments"]
        moments.flush(group)
        if moments.routed:  # agreed by the collective: the same on every rank
            self._agreed_rows = -(-moments.routed // self._shards[1])
        return self._agreed_rows

    # ----------------------------------------------------------------- hot path
    def _logits(self, feats: torch.Tensor, call: Call) -> torch.Tensor | None:
        """The classifier's logits rows when the probed module is the classifier read at its
        input (NC4 then needs no extra GEMM), aligned like the features."""
        out = call.output
        if not (
            self.read == "input"
            and self.extract is None
            and call.module is self.classifier
            and isinstance(out, torch.Tensor)
            and out.shape[:-1] == feats.shape[:-1]
        ):
            return None
        out = out[..., : out.shape[-2] - self.label_shift, :] if self.label_shift else out
        return out.detach().reshape(-1, out.shape[-1])

    def update(self, window, feats, call) -> None:
        feature_rows(feats, call)
        x, y = aligned_targets(feats, call, self.target_key, self.label_shift)
        call.rows = x.shape[0]
        logits = self._logits(feats, call)
        counts = window["counts"]
        valid = y != self.ignore_index
        finite = finite_rows(x)
        call.nonfinite_rows(valid & ~finite, valid)  # (one NaN feature spoils every row)
        counts.add("skipped_nonfinite", (valid & ~finite).sum())
        valid &= finite
        bad = valid & ((y < 0) | (y >= self.num_classes))
        call.bad_rows(
            bad,
            lambda: (
                f"labels out of range [0, {self.num_classes}): {int(bad.sum())} labels, "
                f"min {int(y[bad].min())}, max {int(y[bad].max())} (ignore_index={self.ignore_index})"
            ),
        )
        counts.add("out_of_range", bad.sum())  # skipped and counted: bad rows, not a bad probe
        valid &= ~bad
        window["moments"].update(x, y, valid)
        if (
            self._lag is not None
            and self.classifier is not None
            and self.ncc_max_rows
            and not self._sliced_logits
        ):
            self._update_ncc(counts, x, y, valid, logits)

    def _update_ncc(self, counts, x, y, valid, logits) -> None:
        parts = self.classifier.parameters()
        if logits is None and any(is_sharded(p) or is_partitioned(p) for p in parts):
            # an FSDP2 shard or ZeRO-3 partition in another module's forward: gathering it
            # here could hang a rank (FSDP2) or break DeepSpeed's prefetch order (ZeRO-3)
            return
        if self._lag[0].device != x.device:  # built before the model moved (attach, resume)
            self._lag = tuple(t.to(x.device) for t in self._lag)
        classes, centers, sq, used = self._lag
        k = min(self.ncc_max_rows, x.shape[0])
        # samples of the classes the lagged means cover (ignored rows may hold any label)
        rows = valid[:k] & used[torch.where(valid[:k], y[:k], 0)]
        xs = torch.where(rows[:, None], x[:k], 0)
        dtype = _precision.matmul_dtype(self.matmul_dtype, x.device)
        if logits is None:
            w, b = self._weights()
            mismatch = nearest_class_center_mismatch(xs, centers, classes, w, b, matmul_dtype=dtype)
        else:
            ncc = nearest_class_center(xs, centers, classes, sq, dtype)
            mismatch = ncc != logits[:k].argmax(1)
        counts.add("ncc_mismatch", (mismatch & rows).sum())
        counts.add("ncc_total", rows.sum())

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The classifier's ``(W (C, D), b)`` as the model applies it (a LoRA layer's
        ``W0 + scaling B A``) in a forward, made again only after its parameters changed (an
        unsharded classifier: no collective)."""
        now = applied(self.classifier)  # (a switched adapter, a disabled one)
        adapters = (
            getattr(now, k, None) for k in ("active_adapters", "merged", "disable_adapters")
        )
        key = (id(now), *map(str, adapters), *((id(p), p._version) for p in now.parameters()))
        if self._applied is None or self._applied[0] != key:
            self._applied = (key, *effective_weight(self.classifier, f"{self!r}: classifier"))
        return self._applied[1], self._applied[2]

    @property
    def reads_parameters(self) -> bool:
        return self.classifier is not None

    # ----------------------------------------------------------------- readout
    def readout(self, window) -> Readout:
        moments = window["moments"]
        c = window["counts"].as_dict()
        out = {"classes_used": 0.0}
        means = moments.means() if moments.dim else None  # O(C D): once per readout
        lost = isinstance(moments, ShardedClassMoments) and moments.incomplete
        # before the metrics: with class shards, a rank whose metrics fail raises only after
        # its last collective
        if lost:  # a resumed rank lost its part of the window: nothing to report (any rank)
            return Readout(incomplete=True)
        pictures = self._pictures(moments, means, window.group)
        if moments.dim:  # (D agreed by the reduce)
            weight = None
            if self.classifier is not None:  # (a collective for shards: every rank, every log)
                weight = effective_weight(self.classifier, f"{self!r}: classifier")[0]
                if isinstance(moments, ShardedClassMoments):  # this rank's classes
                    weight = weight[moments.first :][: moments.num_classes]
            out = class_moment_metrics(
                moments,
                means,
                weight,
                self.min_class_count,
                self.tile_size,
                self.pair_sample,
                self._pair_generator(moments),
                window.group,
            )
        out.setdefault("samples", float(moments.count.sum().item()))
        out["skipped_nonfinite"] = float(c["skipped_nonfinite"])
        out["out_of_range"] = float(c["out_of_range"])
        if c["ncc_total"]:
            out["ncc_mismatch_lagged"] = c["ncc_mismatch"] / c["ncc_total"]
        return Readout({self.key(k): v for k, v in out.items()}, pictures=pictures)

    def _pair_generator(self, moments: ClassMoments) -> torch.Generator | None:
        """The draw of a sampled readout: seeded by the window's (reduced) sample count, so
        every rank draws the same classes."""
        if self.pair_sample is None:
            return None
        return torch.Generator().manual_seed(int(moments.count.sum()))

    def _pictures(self, m: ClassMoments, means: torch.Tensor | None, group) -> dict[str, Picture]:
        if means is None:
            return {}
        mu = means[m.count >= self.min_class_count]
        total, first, Cu = mu.sum(0), mu[:64], mu.shape[0]
        if isinstance(m, ShardedClassMoments):  # the first used classes of all ranks
            world = _dist.world_size(group)
            sizes = _dist.all_gather_rows(torch.tensor([Cu], device=mu.device), [1] * world, group)
            sizes = [int(n) for n in sizes]
            _dist.all_reduce_sum_(total, group)
            first = torch.cat(_dist.all_gather_rows(first, [min(n, 64) for n in sizes], group))
            first, Cu = first[:64], sum(sizes)
        if Cu < 2:
            return {}
        k = first.shape[0]
        centred = first - total / Cu
        unit = centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-300)
        etf = -1.0 / (Cu - 1)
        return {
            self.key("class_mean_cosines"): Picture(
                "heatmap",
                unit @ unit.T,
                f"cosines of centred class means ({k} of {Cu} classes); simplex ETF: {etf:.3f}",
                "class",
                "class",
                reference=etf,
            )
        }

    def end_window(self, window, reduced) -> None:
        moments = reduced["moments"]
        used = moments.count >= self.min_class_count
        if moments.dim and not self.rank_local and int(used.sum()) >= 2:
            self._set_lag(used, moments.means()[used], window.device)
        window["moments"].end_window(moments)
        window["counts"].reset()

    def _set_lag(self, used: torch.Tensor, centers: torch.Tensor, device) -> None:
        used = used.to(device)
        centers = centers.to(device=device, dtype=_F64)
        classes = torch.nonzero(used).flatten()
        self._lag = (classes, centers, (centers * centers).sum(1), used)

    # ----------------------------------------------------------------- persistence
    def extra_state(self) -> dict:
        state = {"agreed_rows": self._agreed_rows}
        if self._lag is not None:
            state["lag_used"], state["lag_centers"] = self._lag[3].cpu(), self._lag[1].cpu()
        return state

    def load_extra_state(self, state: dict) -> None:
        self._lag = None
        self._agreed_rows = state.get("agreed_rows")
        if "lag_used" in state:  # (moved to the features' device by their first update)
            self._set_lag(state["lag_used"], state["lag_centers"], "cpu")


class GroupCollapse(NeuralCollapse):
    """Neural-collapse statistics keyed by a nuisance label instead of the class.

    Features cluster by slide, site, scanner, modality or data source when a model learns the
    nuisance: the same per-group moments as :class:`NeuralCollapse` (shared code, exact under DDP),
    with the group id of every sample passed as ``monitor.observe(groups=...)``.

    Args:
        module: path of the module whose output (``read="output"``, default) or input are the
            features.
        num_groups: ``G``.
        Other arguments as in :class:`NeuralCollapse` (no classifier, no NC4; ``matmul_dtype``
            too).

    Reports ``group_variance_ratio`` = ``tr(S_B)/tr(S_T)``
    (:func:`~collapse_monitor.functional.group_variance_ratio`: the fraction of the total feature
    variance explained by the group means, 0 when groups do not matter, 1 when features are
    constant within each group), plus the NC statistics over groups (``nc1``, ``nc1_quotient``,
    ``cdnv``, ``equinorm_features``, ``equiangular``, ``cos_std``, ``classes_used``,
    ``samples``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from collapse_monitor import CollapseMonitor, probes
        >>> model = nn.Sequential(nn.Identity())
        >>> mon = CollapseMonitor(model, [probes.GroupCollapse("0", 2, name="site")], 1)
        >>> site = torch.arange(40) % 2
        >>> with mon.observe(groups=site):  # features that only say which site
        ...     _ = model(torch.stack([site, 1 - site], 1).float())
        >>> mon.step()["collapse/site/group_variance_ratio"]
        1.0
        >>> mon.close()
    """

    headline = ("group_variance_ratio",)

    keywords = {"groups": True}
    target_key = "groups"
    ncc = False
    rules = (
        RuleSpec(
            "group_variance_ratio",
            0.5,
            "above",
            name="group_variance_above",
            message="the nuisance groups explain most of the feature variance",
        ),
    )

    def __init__(self, module: str, num_groups: int, read: str = "output", **kwargs) -> None:
        if "classifier" in kwargs or "shard_classes" in kwargs:
            raise TypeError("GroupCollapse has no classifier and no class shards")
        super().__init__(module, num_groups, read=read, **kwargs)

    def readout(self, window) -> Readout:
        out = super().readout(window)
        m = window["moments"]
        if m.dim and int(m.count.sum()) > 1:
            ratio = group_variance_ratio(m.count, m.means(), m.within_class_scatter())
            out.metrics[self.key("group_variance_ratio")] = ratio
        return out
