"""Output-logit health: softmax collapse (Prieto et al. 2025) and logit divergence (Wortsman et
al. 2023), docs/metrics.md#logithealth."""

from __future__ import annotations

import torch
from torch import nn

from .._sharding import is_sharded
from ..contracts import Readout
from ..functional.logits import logit_health_from_sums
from ..reading import (
    Reading,
    aligned_targets,
    first_tensor,
    floating,
    label_index,
    label_shift,
    token_mask,
)
from ..rules import RuleSpec
from ..stats import LogitSums, Window
from .base import Probe


class LogitHealth(Probe):
    """Softmax collapse and output-logit divergence of a model's logits.

    Reads the logits ``(..., C)`` at the module's output (the first tensor of a tuple output;
    ``extract=`` otherwise); targets from ``observe(targets=...)`` are optional
    (``zero_loss_fraction``; ``ignore_index`` skipped; any other target outside the classes
    is counted in ``out_of_range``, its row kept without a target; ``target_shift`` aligns
    next-token labels as :class:`NeuralCollapse` does). Rows with NaN or Inf, and padded positions
    (``observe(mask=)`` or the model's ``attention_mask``), are counted in ``skipped`` and left
    out.

    Args:
        module: the module whose output are the logits (the LM or classifier head).
        softmax_dtype: the dtype of the training softmax in which "exactly 1" is tested; default the
            logits' dtype promoted to at least float32 (what cross-entropy uses under autocast).
        loss: the normaliser the model trains with: ``"softmax"`` (default), or ``"stablemax"``
            (``collapse_monitor.losses.stablemax_cross_entropy``): ``softmax_collapse`` and
            ``zero_loss_fraction`` then test that StableMax saturates (probability exactly 1 in
            float64).
        ignore_index: target value that is skipped (padding).
        target_shift: ``s > 0`` pairs ``logits[..., :-s, :]`` with ``targets[..., s:]``;
            default: 1 inside a ``transformers`` causal LM (which takes unshifted ``labels``),
            else 0 (:func:`~collapse_monitor.reading.label_shift`).
        nlm: also report ``nlm_cosine``, the cosine between ``-grad W`` and the weight ``W`` of
            the head (an ``nn.Linear``), read from its gradient on logging steps only. Under
            DDP/FSDP each rank reads its own gradient (before the gradients are averaged); the
            metric is the mean of the ranks' cosines, not the cosine of the averaged gradient.
            Not read for a tensor-parallel head (its weight a ``DTensor`` slice).
        pool: see :class:`~collapse_monitor.probes.Probe`.

    Reports ``softmax_collapse`` (fraction of rows whose shifted exp-sum equals 1 exactly),
    ``zero_loss_fraction``, ``log_z_mean``, ``log_z_max``, ``logit_max``, ``logit_norm`` (mean L2
    norm), ``nlm_cosine``, ``samples``, ``skipped``, ``out_of_range``
    (:func:`~collapse_monitor.functional.logit_health`).

    Default rule: ``softmax_collapse > 0.05`` on 2 logs. ``log_z_mean`` grows on healthy runs too (a
    confident classifier's log-partition is its top logit; it passed 5 at step 100 of a healthy
    grokking run exactly as on the collapsing one in benchmarks/detection.py), so no default rule
    watches it; for z-loss style monitoring of an LM add one by hand, e.g.
    ``Rule("collapse/logits/log_z_mean", 5.0, "above", patience=2)``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from collapse_monitor import CollapseMonitor, probes
        >>> model = nn.Sequential(nn.Identity())  # stands for the LM head
        >>> mon = CollapseMonitor(model, [probes.LogitHealth("0", name="logits")], 1)
        >>> with mon.observe():  # row 0: a gap of 200 makes float32's softmax exactly one-hot
        ...     _ = model(torch.tensor([[200.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
        >>> mon.step()["collapse/logits/softmax_collapse"]
        0.5
        >>> mon.close()
    """

    headline = ("softmax_collapse", "log_z_mean")
    bad_input = ("out_of_range",)

    reads = Reading("floating-point logits (..., C)", floating(1), find=first_tensor, hint="logits")
    keywords = {"targets": False}
    uses_token_mask = True
    described = ("label_shift",)  # a checkpoint whose labels were paired otherwise is refused
    rules = (
        RuleSpec(
            "softmax_collapse",
            # 5% of the rows: a healthy CNN under SGD with momentum (99% test accuracy, its
            # loss still falling) held 1.6-2.7% of its rows past float32's 17-nat absorption
            # gap and alarmed at 1%; a grokking run's share rises through 5% 10-140 steps
            # before half its training set saturates (benchmarks/detection.py, zoo rounds)
            0.05,
            "above",
            name="softmax_collapse",
            message="softmax collapse: gradients vanish (Prieto et al.); try StableMax CE, weight "
            "decay or z-loss",
        ),
    )

    def __init__(
        self,
        module: str,
        softmax_dtype: torch.dtype | None = None,
        ignore_index: int = -100,
        target_shift: int | None = None,
        nlm: bool = True,
        loss: str = "softmax",
        name: str | None = None,
        extract=None,
        pool: bool = False,
    ) -> None:
        super().__init__(module, name, extract, pool=pool)
        if loss not in ("softmax", "stablemax"):
            raise ValueError(f"loss must be 'softmax' or 'stablemax', got {loss!r}")
        if (target_shift or 0) < 0:
            raise ValueError(f"target_shift must be >= 0, got {target_shift}")
        self.loss = loss
        self.softmax_dtype = softmax_dtype
        self.ignore_index = label_index(ignore_index)
        self.target_shift = target_shift
        self.label_shift = 0  # resolved at attach
        self.nlm = nlm

    def on_attach(self, setup, found) -> None:
        paths = [p for p, _ in found]
        self.label_shift = label_shift(setup.model, paths, self.target_shift, repr(self))

    def new_window(self) -> Window:
        return Window({"sums": LogitSums()})

    def update(self, window, z, call) -> None:
        real = None
        if z.ndim == 3:  # (B, T, C): the padding of its tokens, aligned as the logits are
            real = token_mask(call, z.shape[0], z.shape[1], z.device)
            if real is not None:
                real = real[:, : z.shape[1] - self.label_shift].reshape(-1)
        z, y = aligned_targets(z, call, "targets", self.label_shift)
        if not z.shape[0]:
            return
        if y is not None:  # ignore_index -> -1 (no target); a label -1 itself names no class
            y = torch.where(y == self.ignore_index, -1, torch.where(y == -1, -2, y))
        bad = window["sums"].update(z, self.softmax_dtype, self.loss, y, real)
        if bad is not None:  # (one NaN column of the head leaves every row without a softmax)
            call.nonfinite_rows(bad if real is None else bad & real, real)
        head = call.module
        if self.nlm and call.recording.logging and isinstance(head, nn.Linear):
            # (a tensor-parallel head's weight is a DTensor slice in the forward: not read)
            if head.weight.requires_grad and not is_sharded(
                head.weight
            ):  # the head's gradient in this step's backward
                weight = head.weight
                call.on_gradient(weight, lambda g: self._add_nlm(window, g, weight))

    def _add_nlm(self, window, grad, weight) -> None:
        cos = torch.nn.functional.cosine_similarity(-grad.flatten(), weight.flatten(), dim=0)
        window["sums"].add_nlm(cos)

    def readout(self, window) -> Readout:
        s = window["sums"]
        out = logit_health_from_sums(
            s.rows.item(),
            s.collapsed.item(),
            s.log_z.item(),
            s.log_z_max.item(),
            s.logit_max.item(),
            s.logit_norm.item(),
            s.target_rows.item(),
            s.zero_loss.item(),
            s.skipped.item(),
            s.out_of_range.item(),
        )
        if s.nlm_count.item():
            out["nlm_cosine"] = (s.nlm_cos / s.nlm_count).item()
        return Readout({self.key(k): v for k, v in out.items()})
