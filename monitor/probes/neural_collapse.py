"""Neural-collapse probe (Papyan, Han & Donoho 2020), METRICS.md section 1."""

from __future__ import annotations

import torch
from torch import nn

from .. import _dist
from .._modules import resolve_modules
from ..functional.neural_collapse import (
    metrics_from_class_statistics,
    nearest_class_center_mismatch,
)
from ..pictures import Picture
from ..rules import Rule
from ..stats import ClassMoments, Counter, to_device
from .base import Probe, first_tensor

_COUNTERS = ("skipped_nonfinite", "out_of_range", "ncc_mismatch", "ncc_total")


class _Window:
    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.moments = ClassMoments(num_classes).to(device)
        self.counts = Counter(_COUNTERS).to(device)


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
            (hidden state at position t, next-token label; pass unshifted ``labels``).
        min_class_count: classes with fewer samples in a window are left out (and counted).
        ncc_max_rows: rows per forward call used for the lagged NC4 (the first ones); 0 turns
            NC4 off. Cost per call is ``rows x C x D`` multiply-adds.
        tile_size: tile of the pairwise metrics at log time.

    Accepts features ``(N, D)`` with targets ``(N,)``, or ``(B, T, D)`` with ``(B, T)``.
    Reports ``collapse/<name>/{nc1, nc1_rank, nc1_quotient, equinorm_features,
    equinorm_weights, equiangular, cos_std, self_duality, cdnv, cdnv_pairs_skipped,
    ncc_mismatch_lagged, classes_used, samples, skipped_nonfinite}``. Rows with NaN/Inf features
    are excluded and counted. State: ``16*C*D + 8*D^2`` bytes (float64), on the features' device.
    """

    needs_targets = True
    target_key = "targets"  # the observe() keyword holding the labels

    def __init__(
        self,
        module: str,
        num_classes: int,
        read: str = "input",
        classifier: str | None = None,
        ignore_index: int = -100,
        target_shift: int = 0,
        min_class_count: int = 2,
        ncc_max_rows: int = 1024,
        tile_size: int = 1024,
        name: str | None = None,
        extract=None,
    ) -> None:
        super().__init__(module, name, extract)
        if read not in ("input", "output"):
            raise ValueError(f"read must be 'input' or 'output', got {read!r}")
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if target_shift < 0 or min_class_count < 1 or ncc_max_rows < 0 or tile_size < 1:
            raise ValueError(
                "expected target_shift >= 0, min_class_count >= 1, ncc_max_rows >= 0, "
                f"tile_size >= 1; got {target_shift}, {min_class_count}, {ncc_max_rows}, {tile_size}"
            )
        self.num_classes = int(num_classes)
        self.read = read
        self.classifier_path = classifier
        self.ignore_index = ignore_index
        self.target_shift = int(target_shift)
        self.min_class_count = int(min_class_count)
        self.ncc_max_rows = int(ncc_max_rows)
        self.tile_size = int(tile_size)
        self.classifier: nn.Linear | None = None
        self._device = torch.device("cpu")
        self._reduced: ClassMoments | None = None
        # lagged NC4: class ids, centres and squared norms frozen at the end of the last window
        self._lag: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # ----------------------------------------------------------------- wiring
    def attach(self, model: nn.Module, monitor) -> None:
        found = self.resolve(model)
        if len(found) != 1:
            raise ValueError(
                f"{self!r}: needs exactly one module, '{self.module}' matched "
                f"{[n for n, _ in found]}"
            )
        path, mod = found[0]
        if self.classifier_path is not None:
            cls = self._resolve_one(model, self.classifier_path)
            if not isinstance(cls, nn.Linear):
                raise TypeError(
                    f"{self!r}: classifier '{self.classifier_path}' must be nn.Linear, "
                    f"got {type(cls).__name__}"
                )
            self.classifier = cls
        elif self.read == "input" and isinstance(mod, nn.Linear) and self.target_key == "targets":
            self.classifier = mod
        if self.classifier is not None and self.classifier.out_features != self.num_classes:
            raise ValueError(
                f"{self!r}: classifier weight has shape {tuple(self.classifier.weight.shape)} "
                f"but num_classes={self.num_classes}"
            )
        self._module_path = path
        param = next(mod.parameters(), None)
        self._device = param.device if param is not None else torch.device("cpu")
        super().attach(model, monitor)

    def _resolve_one(self, model: nn.Module, path: str) -> nn.Module:
        found = resolve_modules(model, path, owner=repr(self))
        if len(found) != 1:
            raise ValueError(f"{self!r}: '{path}' matched {[n for n, _ in found]}, need one")
        return found[0][1]

    def new_window(self) -> _Window:
        return _Window(self.num_classes, self._device)

    # ----------------------------------------------------------------- hot path
    def _features_and_targets(self, path, module, args, kwargs, output):
        if self.extract is not None:
            feats = self.extract(module, args, output)
        elif self.read == "input":
            feats = first_tensor(args, kwargs)
        else:
            feats = output
        if not isinstance(feats, torch.Tensor):
            raise self.error(
                path,
                f"expected the module's {self.read} to be a Tensor, got {type(feats).__name__}; "
                "pass extract=lambda module, args, output: <features tensor>",
            )
        if not feats.is_floating_point():
            raise self.error(path, f"features must be floating point, got {feats.dtype}")
        if feats.ndim < 2:
            raise self.error(
                path, f"features must be (N, D) or (B, T, D), got shape {tuple(feats.shape)}"
            )
        targets = self.monitor.context.get(self.target_key)
        if targets is None:
            raise self.error(path, f"needs labels: call monitor.observe({self.target_key}=labels)")
        targets = torch.as_tensor(targets)
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise self.error(
                path, f"targets must be integer class indices, got dtype {targets.dtype}"
            )
        logits = output if self._output_is_logits(module, output, feats) else None
        s = self.target_shift
        if s:
            if feats.ndim < 3:
                raise self.error(
                    path, f"target_shift needs (B, T, D) features, got {tuple(feats.shape)}"
                )
            feats, targets = feats[..., :-s, :], targets[..., s:]
            logits = None if logits is None else logits[..., :-s, :]
        if tuple(targets.shape) != tuple(feats.shape[:-1]):
            raise self.error(
                path,
                f"targets of shape {tuple(targets.shape)} do not match features of shape "
                f"{tuple(feats.shape)} (expected targets of shape {tuple(feats.shape[:-1])})",
            )
        x = feats.detach().reshape(-1, feats.shape[-1])
        y = to_device(targets.reshape(-1), x.device).to(torch.int64)
        if logits is not None:
            logits = logits.detach().reshape(-1, logits.shape[-1])
        return x, y, logits

    def _output_is_logits(self, module, output, feats) -> bool:
        return (
            self.read == "input"
            and self.extract is None
            and module is self.classifier
            and isinstance(output, torch.Tensor)
            and output.shape[:-1] == feats.shape[:-1]
        )

    def observe(self, path, module, args, kwargs, output) -> None:
        x, y, logits = self._features_and_targets(path, module, args, kwargs, output)
        win = self.window
        if win.counts.device != x.device:
            win.counts.to(x.device)
        valid = y != self.ignore_index
        finite = torch.isfinite(x).all(1)
        win.counts.add("skipped_nonfinite", (valid & ~finite).sum())
        valid &= finite
        bad = valid & ((y < 0) | (y >= self.num_classes))
        if x.device.type == "cpu":  # checking costs no device sync here
            if bad.any():
                yb = y[bad]
                raise self.error(
                    path,
                    f"labels out of range [0, {self.num_classes}): {int(bad.sum())} labels, "
                    f"min {int(yb.min())}, max {int(yb.max())} (ignore_index={self.ignore_index})",
                )
        else:  # counted on the device, raised at the next log
            win.counts.add("out_of_range", bad.sum())
        valid &= ~bad
        win.moments.update(x, y, valid)
        if self._lag is not None and self.classifier is not None and self.ncc_max_rows:
            self._observe_ncc(x, valid, logits)

    def _observe_ncc(self, x, valid, logits) -> None:
        k = min(self.ncc_max_rows, x.shape[0])
        rows = valid[:k]
        xs = torch.where(rows[:, None], x[:k], 0)
        classes, centers, _ = self._lag
        if logits is None:
            mismatch = nearest_class_center_mismatch(
                xs, centers, classes, self.classifier.weight, self.classifier.bias
            )
        else:
            sq = self._lag[2]
            ncc = classes[(sq - 2 * xs.to(torch.float64) @ centers.T).argmin(1)]
            mismatch = ncc != logits[:k].argmax(1)
        counts = self.window.counts
        counts.add("ncc_mismatch", (mismatch & rows).sum())
        counts.add("ncc_total", rows.sum())

    # ----------------------------------------------------------------- readout
    def _synced(self, group=None) -> tuple[ClassMoments, Counter]:
        win = self.window
        if not _dist.is_distributed(group):
            return win.moments, win.counts
        return win.moments.clone().all_reduce(group), win.counts.clone().all_reduce(group)

    def compute(self, group=None) -> dict[str, float]:
        moments, counts = self._synced(group)
        self._reduced = moments
        c = dict(zip(_COUNTERS, counts.counts.tolist()))
        if c["out_of_range"]:
            raise ValueError(
                f"NeuralCollapse '{self.name}': {c['out_of_range']} labels outside "
                f"[0, {self.num_classes}) in this window (they were excluded)"
            )
        if moments.dim:
            weight = None if self.classifier is None else self.classifier.weight
            out = metrics_from_class_statistics(
                moments.count,
                moments.means(),
                moments.within_class_scatter(),
                moments.class_variances(),
                weight,
                self.min_class_count,
                self.tile_size,
            )
        else:
            out = {"classes_used": 0.0}
        out["samples"] = float(moments.count.sum().item())
        out["skipped_nonfinite"] = float(c["skipped_nonfinite"])
        if c["ncc_total"]:
            out["ncc_mismatch_lagged"] = c["ncc_mismatch"] / c["ncc_total"]
        return out

    def pictures(self) -> dict[str, Picture]:
        m = self._reduced
        used = None if m is None or not m.dim else m.count >= self.min_class_count
        if used is None or int(used.sum()) < 2:
            return {}
        mu = m.means()[used]
        Cu, k = mu.shape[0], min(mu.shape[0], 64)
        centred = mu - mu.mean(0)
        unit = centred[:k] / centred[:k].norm(dim=1, keepdim=True).clamp_min(1e-300)
        etf = -1.0 / (Cu - 1)
        return {
            "class_mean_cosines": Picture(
                "heatmap",
                unit @ unit.T,
                f"cosines of centred class means ({k} of {Cu} classes); simplex ETF: {etf:.3f}",
                "class",
                "class",
                reference=etf,
            )
        }

    def end_window(self) -> None:
        reduced = self._reduced if self._reduced is not None else self._synced()[0]
        self._reduced = None
        used = reduced.count >= self.min_class_count
        if reduced.dim and int(used.sum()) >= 2:
            classes = torch.nonzero(used).flatten()
            self._set_lag(classes, reduced.means()[used])
        moments = self.window.moments
        moments.end_window(reduced)
        self.window = self.new_window()
        self.window.moments = moments

    def _set_lag(self, classes: torch.Tensor, centers: torch.Tensor) -> None:
        centers = centers.to(device=self._device, dtype=torch.float64)
        self._lag = (classes.to(self._device), centers, (centers * centers).sum(1))

    # ----------------------------------------------------------------- persistence
    def state_dict(self, group=None, sync: bool = True) -> dict:
        win = self.window
        moments, counts = self._synced(group) if sync else (win.moments, win.counts)
        state = {"moments": moments.state_dict(), "counts": counts.state_dict()}
        if self._lag is not None:
            state["lag_classes"] = self._lag[0].cpu()
            state["lag_centers"] = self._lag[1].cpu()
        return state

    def load_state_dict(self, state: dict, keep_window: bool = True) -> None:
        win = self.new_window()
        win.moments.load_state_dict(state["moments"])
        win.counts.load_state_dict(state["counts"])
        if not keep_window:
            win.moments.reset()
            win.counts.reset()
        self.window = win
        self._lag = None
        if "lag_classes" in state:
            self._set_lag(state["lag_classes"], state["lag_centers"])


class GroupCollapse(NeuralCollapse):
    """Neural-collapse statistics keyed by a nuisance label instead of the class.

    Features cluster by slide, site, scanner, modality or data source when a model learns the
    nuisance: the same per-group moments as :class:`NeuralCollapse` (shared code, exact under DDP),
    with the group id of every sample passed as ``monitor.observe(groups=...)``.

    Args:
        module: path of the module whose output (``read="output"``, default) or input are the
            features.
        num_groups: ``G``.
        Other arguments as in :class:`NeuralCollapse` (no classifier, no NC4).

    Reports ``group_variance_ratio`` = ``tr(S_B)/tr(S_T)``: the fraction of the total feature
    variance explained by the group means (sample-weighted; 0 when groups do not matter, 1 when
    features are constant within each group), plus the NC statistics over groups (``nc1``,
    ``nc1_quotient``, ``cdnv``, ``equinorm_features``, ``equiangular``, ``cos_std``,
    ``classes_used``, ``samples``).
    """

    needs_targets = False
    target_key = "groups"

    def __init__(self, module: str, num_groups: int, read: str = "output", **kwargs) -> None:
        if "classifier" in kwargs:
            raise TypeError("GroupCollapse has no classifier")
        super().__init__(module, num_groups, read=read, ncc_max_rows=0, **kwargs)

    def default_rules(self) -> list[Rule]:
        return [
            Rule(
                f"collapse/{self.name}/group_variance_ratio",
                0.5,
                "above",
                patience=2,
                name=f"{self.name}/group_variance_above",
                message="the nuisance groups explain most of the feature variance",
            ),
        ]

    def compute(self, group=None) -> dict[str, float]:
        out = super().compute(group)
        m = self._reduced
        if m.dim and int(m.count.sum()) > 1:
            n = m.count.to(torch.float64)
            means = m.means()
            grand = (n[:, None] * means).sum(0) / n.sum()
            between = (n * (means - grand).pow(2).sum(1)).sum()
            within = m.within_class_scatter().trace()
            out["group_variance_ratio"] = (between / (between + within)).item()
        return out
