"""Output-logit health, rank collapse across depth and dormant units: METRICS.md 3.2, 6, 7, 8."""

from __future__ import annotations

import torch
from torch import nn

from ..functional import logits as L
from ..pictures import Picture
from ..rules import Rule
from ..stats import SumStatistic, to_device
from .base import WindowedProbe

_F64 = torch.float64


def _tensor_output(output):
    """The output tensor, or the first tensor of a tuple/list output (e.g. transformer blocks)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


class _LogitSums(SumStatistic):
    def __init__(self) -> None:
        super().__init__()
        for name in (
            "rows",
            "collapsed",
            "target_rows",
            "zero_loss",
            "log_z",
            "logit_norm",
            "nlm_cos",
            "nlm_count",
        ):
            self.add_state(name, (), _F64)
        self.add_max_state("log_z_max", ())
        self.add_max_state("logit_max", ())


class LogitHealth(WindowedProbe):
    """Softmax collapse (Prieto et al. 2025) and output-logit divergence (Wortsman et al. 2023).

    Reads the logits ``(..., C)`` at the module's output (``extract=`` otherwise); targets from
    ``observe(targets=...)`` are optional (``zero_loss_fraction``; ``ignore_index`` skipped).

    Args:
        module: the module whose output are the logits (the LM or classifier head).
        softmax_dtype: the dtype of the training softmax in which "exactly 1" is tested; default the
            logits' dtype promoted to at least float32 (what cross-entropy uses under autocast).
        loss: the normaliser the model trains with: ``"softmax"`` (default), or ``"stablemax"``
            (``monitor.losses.stablemax_cross_entropy``): ``softmax_collapse`` and
            ``zero_loss_fraction`` then test that StableMax saturates (probability exactly 1 in
            float64).
        nlm: also report ``nlm_cosine``, the cosine between ``-grad`` and the weight of the head (an
            ``nn.Linear``), read by a gradient hook on logging steps only.

    Reports ``softmax_collapse`` (fraction of rows whose shifted exp-sum equals 1 exactly),
    ``zero_loss_fraction``, ``log_z_mean``, ``log_z_max``, ``logit_max``, ``logit_norm`` (mean L2
    norm), ``nlm_cosine``, ``samples``.
    """

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

    def new_window(self) -> dict:
        return {"sums": _LogitSums()}

    def default_rules(self) -> list[Rule]:
        prefix = f"collapse/{self.name}"
        return [
            Rule(
                f"{prefix}/softmax_collapse",
                0.01,
                "above",
                patience=2,
                name=f"{self.name}/softmax_collapse",
                message="softmax collapse: gradients vanish (Prieto et al.); try StableMax CE, weight decay or z-loss",
            ),
            Rule(
                f"{prefix}/log_z_mean",
                5.0,
                "above",
                patience=2,
                name=f"{self.name}/log_z_drift",
                message="output-logit divergence: consider z-loss (monitor.losses.z_loss)",
            ),
        ]

    def attach(self, model, monitor) -> None:
        super().attach(model, monitor)
        ((path, mod),) = self.resolve(model)[:1]
        if self.nlm and isinstance(mod, nn.Linear):
            self._handles.append(mod.weight.register_hook(self._nlm_hook(mod.weight)))

    def _nlm_hook(self, weight):
        def hook(grad):
            mon = self.monitor
            if mon is not None and mon.logging_this_step and self._observed and not self.disabled:
                self.guarded(self._add_nlm, grad, weight)

        return hook

    def _add_nlm(self, grad, weight) -> None:
        cos = torch.nn.functional.cosine_similarity(-grad.flatten(), weight.flatten(), dim=0)
        sums = self.window["sums"]
        sums.nlm_cos += cos.to(_F64)
        sums.nlm_count += 1

    _observed = False

    def observe(self, path, module, args, kwargs, output) -> None:
        z = (
            self.extract(module, args, output)
            if self.extract is not None
            else _tensor_output(output)
        )
        if not isinstance(z, torch.Tensor) or not z.is_floating_point() or z.ndim < 1:
            raise self.error(path, "expected floating-point logits (..., C); pass extract=")
        z = z.detach().reshape(-1, z.shape[-1])
        if not z.shape[0]:
            return
        self._move(z.device)
        self._observed = True
        sums = self.window["sums"]
        dtype = self.softmax_dtype or torch.promote_types(z.dtype, torch.float32)
        sums.rows += z.shape[0]
        if self.loss == "stablemax":
            sums.collapsed += L.stablemax_collapsed(z).sum()
        else:
            sums.collapsed += L.softmax_collapsed(z, dtype).sum()
        targets = self.monitor.context.get("targets")
        if targets is not None:
            y = to_device(torch.as_tensor(targets), z.device).reshape(-1)
            if y.numel() != z.shape[0]:
                raise self.error(
                    path, f"targets of {y.numel()} entries for {z.shape[0]} logit rows"
                )
            keep = y != self.ignore_index
            zero = L.zero_loss(z, torch.where(keep, y, 0), dtype, self.loss) & keep
            sums.target_rows += keep.sum()
            sums.zero_loss += zero.sum()
        z64 = z.to(_F64)
        log_z = torch.logsumexp(z64, -1)
        sums.log_z += log_z.sum()
        sums.logit_norm += z64.norm(dim=-1).sum()
        torch.maximum(sums.log_z_max, log_z.max(), out=sums.log_z_max)
        torch.maximum(sums.logit_max, z64.max(), out=sums.logit_max)

    def compute(self, group=None) -> dict[str, float]:
        s = self._synced(group)["sums"]
        rows = s.rows.item()
        out = {"samples": rows}
        if rows:
            out.update(
                softmax_collapse=(s.collapsed / s.rows).item(),
                log_z_mean=(s.log_z / s.rows).item(),
                log_z_max=s.log_z_max.item(),
                logit_max=s.logit_max.item(),
                logit_norm=(s.logit_norm / s.rows).item(),
            )
        if s.target_rows.item():
            out["zero_loss_fraction"] = (s.zero_loss / s.target_rows).item()
        if s.nlm_count.item():
            out["nlm_cosine"] = (s.nlm_cos / s.nlm_count).item()
        return out

    def end_window(self) -> None:
        super().end_window()
        self._observed = False


class _LayerSums(SumStatistic):
    def __init__(self, names) -> None:
        super().__init__()
        for name in names:
            self.add_state(name, (), _F64)


class TokenUniformity(WindowedProbe):
    """Rank collapse across depth (Dong et al. 2021): per block, how alike the tokens of a sequence are.

    Reads each selected module's output ``(B, T, D)`` (or the first tensor of a tuple output);
    padding from ``observe(mask=...)`` (``(B, T)``, true for real tokens). Reports per layer
    ``<layer>/rho`` (mean token cosine, 1 = all tokens aligned; inflated by a shared offset) and
    ``<layer>/r_f`` (Frobenius residual after removing the token mean, 0 = identical tokens),
    averaged over sequences with at least 2 tokens.
    """

    def attach(self, model, monitor) -> None:
        self.layers = [p for p, _ in self.resolve(model)]
        self._last: list[float] = []  # r_f per layer, from the last compute()
        super().attach(model, monitor)

    def new_window(self) -> dict:
        return {
            layer: _LayerSums(("sequences", "rho", "r_f")) for layer in getattr(self, "layers", [])
        }

    def default_rules(self) -> list[Rule]:
        prefix = f"collapse/{self.name}"
        return [
            Rule(
                f"{prefix}/*/r_f",
                0.1,
                "below",
                patience=2,
                name=f"{self.name}/rank_collapse",
                message="tokens of a sequence are nearly identical at this depth (rank collapse)",
            )
        ]

    def observe(self, path, module, args, kwargs, output) -> None:
        x = (
            self.extract(module, args, output)
            if self.extract is not None
            else _tensor_output(output)
        )
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            raise self.error(path, "expected (B, T, D) hidden states; pass extract=")
        self._move(x.device)
        mask = self.monitor.context.get("mask")
        if mask is not None and tuple(mask.shape) != tuple(x.shape[:2]):
            raise self.error(
                path, f"mask of shape {tuple(mask.shape)} for hidden states {tuple(x.shape)}"
            )
        rho, r_f = L.token_uniformity(
            x.detach(), None if mask is None else to_device(mask, x.device)
        )
        ok = torch.isfinite(rho)
        st = self.window[path]
        st.sequences += ok.sum()
        st.rho += torch.where(ok, rho, 0.0).sum()
        st.r_f += torch.where(ok, r_f, 0.0).sum()

    def compute(self, group=None) -> dict[str, float]:
        out = {}
        for layer, st in self._synced(group).items():
            if st.sequences.item():
                out[f"{layer}/rho"] = (st.rho / st.sequences).item()
                out[f"{layer}/r_f"] = (st.r_f / st.sequences).item()
        self._last = [out[f"{layer}/r_f"] for layer in self.layers if f"{layer}/r_f" in out]
        return out

    def pictures(self) -> dict[str, Picture]:
        if not self._last:
            return {}
        return {
            "r_f_by_depth": Picture(
                "bars",
                torch.tensor(self._last),
                "token residual r_f by depth (0: all tokens identical)",
                "layer (in model order)",
                "r_f",
                reference=0.1,
            )
        }


class _UnitSums(SumStatistic):
    def __init__(self) -> None:
        super().__init__()
        self.units = 0
        self.add_state("abs_sum", lambda st: (st.units,), _F64)
        self.add_state("rows", (), _F64)

    def load_state_dict(self, state) -> None:
        self.units = state["abs_sum"].shape[0]
        self.reset()
        super().load_state_dict(state)


class DormantUnits(WindowedProbe):
    """τ-dormant units per layer (Sokar et al. 2023), from post-activation outputs.

    Select the modules whose output is the activation (``"net.*.act"``, or Linear/Conv layers
    followed by nothing); units are the last dimension of ``(..., H)`` outputs and the channel
    dimension of 4-D/5-D conv outputs. Reports per layer ``<layer>/dormant_fraction`` (score
    ``E|h_i| / mean_k E|h_k| <= tau``) and ``<layer>/mean_abs`` (the raw ``E|h|``: a whole-layer
    shrink is invisible in the relative score), plus ``dormant_fraction`` over all units.
    """

    every_step = True  # O(B*D) per update

    def __init__(
        self, module: str, tau: float = 0.025, name: str | None = None, extract=None
    ) -> None:
        super().__init__(module, name, extract)
        self.tau = float(tau)
        self._masks: dict[str, torch.Tensor] = {}
        self._scores: dict[str, torch.Tensor] = {}

    def attach(self, model, monitor) -> None:
        self.layers = [p for p, _ in self.resolve(model)]
        super().attach(model, monitor)

    def new_window(self) -> dict:
        return {layer: _UnitSums() for layer in getattr(self, "layers", [])}

    def default_rules(self) -> list[Rule]:
        return [
            Rule(
                f"collapse/{self.name}/*/dormant_fraction",
                0.1,
                "above",
                patience=2,
                name=f"{self.name}/dormant",
                message="over 10% of the layer's units are dormant: consider ReDo",
            )
        ]

    def observe(self, path, module, args, kwargs, output) -> None:
        a = (
            self.extract(module, args, output)
            if self.extract is not None
            else _tensor_output(output)
        )
        if not isinstance(a, torch.Tensor) or not a.is_floating_point() or a.ndim < 2:
            raise self.error(
                path,
                "expected floating-point activations (N, ..., H) or (N, C, ...); pass extract=",
            )
        a = a.detach().abs().to(_F64)
        a = a.movedim(1, -1) if a.ndim in (4, 5) else a
        a = a.reshape(-1, a.shape[-1])
        st = self.window[path]
        if not st.units:
            st.units, st.device = a.shape[1], a.device
            st.reset()
        st.abs_sum += a.sum(0)
        st.rows += a.shape[0]

    def compute(self, group=None) -> dict[str, float]:
        out, total, dormant = {}, 0, 0
        self._masks, self._scores = {}, {}
        for layer, st in self._synced(group).items():
            if not st.rows.item():
                continue
            per_unit = st.abs_sum / st.rows
            score = per_unit / (per_unit.mean() + 1e-9)
            mask = score <= self.tau
            self._masks[layer] = mask
            self._scores[layer] = score
            out[f"{layer}/dormant_fraction"] = mask.to(_F64).mean().item()
            out[f"{layer}/mean_abs"] = per_unit.mean().item()
            total += mask.numel()
            dormant += int(mask.sum())
        if total:
            out["dormant_fraction"] = dormant / total
        return out

    def pictures(self) -> dict[str, Picture]:
        return {
            f"{layer}/unit_scores": Picture(
                "bars",
                score.sort().values,
                f"{layer}: unit score |a| / layer mean, sorted (dormant: <= tau = {self.tau:g})",
                "unit (sorted)",
                "score",
                reference=self.tau,
            )
            for layer, score in self._scores.items()
        }

    def dormant_masks(self) -> dict[str, torch.Tensor]:
        """``{layer: (H,) bool}`` of the last :meth:`compute` (identical on every rank)."""
        return self._masks
