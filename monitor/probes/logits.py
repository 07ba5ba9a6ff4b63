"""Output-logit health: softmax collapse (Prieto et al. 2025) and logit divergence (Wortsman et
al. 2023), METRICS.md sections 3.2 and 6."""

from __future__ import annotations

import torch
from torch import nn

from ..contracts import Readout
from ..functional.logits import logit_health_from_sums
from ..hooks import HookSet
from ..reading import Reading, first_tensor, floating
from ..rules import RuleSpec
from ..stats import LogitSums, Window, to_device
from .base import Probe


class LogitHealth(Probe):
    """Softmax collapse and output-logit divergence of a model's logits.

    Reads the logits ``(..., C)`` at the module's output (the first tensor of a tuple output;
    ``extract=`` otherwise); targets from ``observe(targets=...)`` are optional
    (``zero_loss_fraction``; ``ignore_index`` skipped).

    Args:
        module: the module whose output are the logits (the LM or classifier head).
        softmax_dtype: the dtype of the training softmax in which "exactly 1" is tested; default the
            logits' dtype promoted to at least float32 (what cross-entropy uses under autocast).
        loss: the normaliser the model trains with: ``"softmax"`` (default), or ``"stablemax"``
            (``collapse_monitor.losses.stablemax_cross_entropy``): ``softmax_collapse`` and
            ``zero_loss_fraction`` then test that StableMax saturates (probability exactly 1 in
            float64).
        nlm: also report ``nlm_cosine``, the cosine between ``-grad W`` and the weight ``W`` of
            the head (an ``nn.Linear``), read from its gradient on logging steps only.

    Reports ``softmax_collapse`` (fraction of rows whose shifted exp-sum equals 1 exactly),
    ``zero_loss_fraction``, ``log_z_mean``, ``log_z_max``, ``logit_max``, ``logit_norm`` (mean L2
    norm), ``nlm_cosine``, ``samples`` (:func:`~collapse_monitor.functional.logit_health`).
    """

    reads = Reading("floating-point logits (..., C)", floating(1), find=first_tensor, hint="logits")
    keywords = {"targets": False}
    rules = (
        RuleSpec(
            "softmax_collapse",
            0.01,
            "above",
            name="softmax_collapse",
            message="softmax collapse: gradients vanish (Prieto et al.); try StableMax CE, weight "
            "decay or z-loss",
        ),
        RuleSpec(
            "log_z_mean",
            5.0,
            "above",
            name="log_z_drift",
            message="output-logit divergence: consider z-loss (collapse_monitor.losses.z_loss)",
        ),
    )

    def __init__(
        self,
        module: str,
        softmax_dtype: torch.dtype | None = None,
        ignore_index: int = -100,
        nlm: bool = True,
        loss: str = "softmax",
        name: str | None = None,
        extract=None,
    ) -> None:
        super().__init__(module, name, extract)
        if loss not in ("softmax", "stablemax"):
            raise ValueError(f"loss must be 'softmax' or 'stablemax', got {loss!r}")
        self.loss = loss
        self.softmax_dtype = softmax_dtype
        self.ignore_index = ignore_index
        self.nlm = nlm
        self._nlm_hooks = HookSet()  # one gradient hook, armed for a logging step's backward

    def new_window(self) -> Window:
        return Window({"sums": LogitSums()})

    def update(self, window, z, call) -> None:
        z = z.detach().reshape(-1, z.shape[-1])
        if not z.shape[0]:
            return
        dtype = self.softmax_dtype or torch.promote_types(z.dtype, torch.float32)
        targets = self.keyword("targets", call.path)
        if targets is not None:
            y = to_device(torch.as_tensor(targets), z.device).reshape(-1)
            if y.numel() != z.shape[0]:
                raise self.error(
                    call.path, f"targets of {y.numel()} entries for {z.shape[0]} logit rows"
                )
            targets = torch.where(y != self.ignore_index, y, -1)
        window["sums"].update(z, dtype, self.loss, targets)
        head = call.module
        if self.nlm and self._recording.logging and isinstance(head, nn.Linear):
            if not len(self._nlm_hooks) and head.weight.requires_grad:
                self._nlm_hooks.tensor(head.weight, lambda g: self._nlm(g, head.weight))

    def _nlm(self, grad, weight) -> None:
        self._nlm_hooks.remove()  # one backward per logging step
        if not self.disabled:
            self.guarded(self._add_nlm, grad, weight)

    def _add_nlm(self, grad, weight) -> None:
        cos = torch.nn.functional.cosine_similarity(-grad.flatten(), weight.flatten(), dim=0)
        self.window["sums"].add_nlm(cos)

    def end_step(self) -> None:
        super().end_step()
        self._nlm_hooks.remove()  # a logging step without backward (evaluation)

    def detach(self) -> None:
        super().detach()
        self._nlm_hooks.remove()

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
        )
        if s.nlm_count.item():
            out["nlm_cosine"] = (s.nlm_cos / s.nlm_count).item()
        return Readout({self.key(k): v for k, v in out.items()})
