"""Diversity of the completions sampled for one prompt (docs/metrics.md#generationdiversity):
a policy that collapses samples the same completion for every draw of a group."""

from __future__ import annotations

import torch

from ..cadence import EVERY_STEP
from ..contracts import Readout
from ..functional.diversity import NGRAMS, group_keys, group_sums
from ..reading import Reading, is_index, token_mask
from ..stats import Statistic, Window, to_device
from .base import Probe

_F64 = torch.float64
_METRICS = (
    *(f"distinct_{n}" for n in NGRAMS),
    "pairwise_overlap",
    "identical_fraction",
    "zero_advantage_fraction",
)
# an advantage this small is zero: a group's equal rewards standardised in float32 leave ~1e-8
_ZERO = 1e-6


class DiversitySums(Statistic):
    """Per metric, the sum of per-group (or per-pair) values and how many define it; groups and
    completions seen (all summed over ranks)."""

    def __init__(self) -> None:
        super().__init__()
        for name in _METRICS:
            self.add_state(name, (), _F64)
            self.add_state(f"{name}_count", (), _F64)
        self.add_state("groups", (), _F64)
        self.add_state("completions", (), _F64)
        self.add_state("mixed_groups", (), _F64)

    @torch.no_grad()
    def add(self, sums: dict[str, torch.Tensor]) -> None:
        for name in self.state_names:
            getattr(self, name).add_(to_device(sums[name], self.device))


class GenerationDiversity(Probe):
    """Diversity within groups of completions sampled from one prompt (GRPO's ``num_generations``).

    Reads the token ids ``(B, T)`` a model is called with (its first input: ``input_ids``), in the
    training forward that scores the completions. The completion tokens: positions whose label is
    not ``ignore_index`` (``observe(targets=labels)``; TRL's GRPO passes its completion labels),
    else ``observe(mask=)``, else the model's ``attention_mask`` (the prompt then counts too).
    The groups: ``observe(groups=)`` ``(B,)`` ids when given; else, with ``group_by="prompt"``
    (default), rows whose tokens outside the completion are the same (one prompt: TRL shuffles a
    step's rows, so a prompt's completions are not in a row); with ``group_by="order"``, rows
    ``g * G .. g * G + G - 1``. Rows are sorted by group and cut in groups of ``G``; a group
    that mixes prompts (a prompt with a number of rows that is not a multiple of ``G``) is
    left out and counted in ``mixed_groups``.

    Per group: ``distinct_1``, ``distinct_2`` (distinct n-grams over all n-grams of the group's
    completions, Li et al. 2016), ``pairwise_overlap`` (mean Jaccard index of the 2-gram sets of
    each pair), ``identical_fraction`` (pairs with the same token sequence); with
    ``observe(advantages=)`` (per sequence or per token), ``zero_advantage_fraction``, the share of
    groups whose advantages are all 0 (``|A| <= 1e-6``: equal rewards, no gradient); each
    reported as its mean over the window's groups, with ``groups`` and ``completions``
    (:func:`~collapse_monitor.functional.generation_diversity`). N-grams are exact integer codes
    (no hashing); the update is fixed-size tensor work with no host sync; memory does not grow with
    the run. No default rule: a policy that learned a task with one right answer repeats
    itself too (healthy GRPO twins of benchmarks/detection.py reached ``identical_fraction``
    0.85); read it beside :class:`TokenEntropy`'s rule.

    Args:
        module: the model whose forward receives the token ids (``""``: the monitored model).
        group_size: ``G``, completions per prompt; a call's rows must be a multiple of it.
        group_by: ``"prompt"`` or ``"order"`` (see above), when no ``observe(groups=)``.
        vocab_size: the token ids' range (default: the model's ``config.vocab_size``).
        ignore_index: the label of positions that are not completion tokens.

    Raises:
        ValueError: at attach, no ``vocab_size`` known; at a call, rows not a multiple of ``G``
            (a group split between micro-batches or ranks).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from collapse_monitor import CollapseMonitor, probes
        >>> model = nn.Sequential(nn.Identity())  # stands for a language model taking ids
        >>> probe = probes.GenerationDiversity("", group_size=2, vocab_size=10, name="div")
        >>> mon = CollapseMonitor(model, [probe], 1)
        >>> ids = torch.tensor([[1, 2, 3], [1, 2, 3], [4, 5, 6], [4, 6, 5]])  # 2 prompts
        >>> with mon.observe():
        ...     _ = model(ids)
        >>> m = mon.step()
        >>> m["collapse/div/identical_fraction"], m["collapse/div/groups"]
        (0.5, 2.0)
        >>> mon.close()
    """

    headline = ("distinct_2",)
    reads = Reading(
        "token ids (B, T)",
        lambda v: is_index(v) and v.ndim == 2,
        hint="input_ids",
    )
    sampling = EVERY_STEP
    keywords = {"targets": False, "mask": False, "advantages": False, "groups": False}
    uses_token_mask = True
    skips_generation = True

    def __init__(
        self,
        module: str = "",
        group_size: int = 2,
        group_by: str = "prompt",
        vocab_size: int | None = None,
        ignore_index: int = -100,
        name: str | None = None,
        extract=None,
    ) -> None:
        super().__init__(module, name, extract, read="input")
        if int(group_size) < 2:
            raise ValueError(f"group_size must be >= 2, got {group_size}")
        if group_by not in ("prompt", "order"):
            raise ValueError(f"group_by must be 'prompt' or 'order', got {group_by!r}")
        self.group_size = int(group_size)
        self.group_by = group_by
        self.vocab_size = vocab_size
        self.ignore_index = ignore_index
        self.label_shift = 0  # labels mark the completion tokens at their own positions

    def on_attach(self, setup, found) -> None:
        if self.vocab_size is None:
            config = getattr(setup.model, "config", None)
            text = config.get_text_config() if hasattr(config, "get_text_config") else config
            self.vocab_size = getattr(text, "vocab_size", None)
        if not self.vocab_size:
            raise ValueError(f"{self!r}: pass vocab_size= (the model has no config.vocab_size)")

    def new_window(self) -> Window:
        return Window({"sums": DiversitySums()})

    def update(self, window, ids, call) -> None:
        B, T = ids.shape
        if B % self.group_size:
            raise call.error(
                f"{B} rows are not groups of {self.group_size}: a prompt's completions must "
                "reach the model in one call (per-device batch a multiple of num_generations)"
            )
        labels = call.keyword("targets")
        if labels is not None:
            labels = torch.as_tensor(labels)
            if tuple(labels.shape) != (B, T):
                raise call.error(f"targets of shape {tuple(labels.shape)} for ids {(B, T)}")
            mask = to_device(labels, ids.device) != self.ignore_index
        else:
            mask = token_mask(call, B, T, ids.device)
            mask = torch.ones(B, T, dtype=torch.bool, device=ids.device) if mask is None else mask
        keys = self._keys(call, ids, mask)
        valid = None
        adv = call.keyword("advantages")
        if keys is not None:  # rows sorted by group, cut in groups of G that must share a key
            order = torch.argsort(keys, stable=True)
            ids, mask, keys = ids[order], mask[order], keys[order]
            groups = keys.reshape(-1, self.group_size)
            valid = (groups == groups[:, :1]).all(1)
            if adv is not None:
                adv = to_device(torch.as_tensor(adv), ids.device)[order]
        sums = group_sums(ids, mask, self.group_size, int(self.vocab_size), valid)
        sums.update(self._zero_advantage(call, adv, mask, valid))
        sums["mixed_groups"] = (
            torch.zeros((), dtype=_F64) if valid is None else (~valid).sum().to(_F64)
        )
        window["sums"].add(sums)

    def _keys(self, call, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        given = call.keyword("groups")
        if given is not None:
            given = to_device(torch.as_tensor(given), ids.device).to(torch.int64)
            if tuple(given.shape) != (ids.shape[0],):
                raise call.error(f"groups of shape {tuple(given.shape)}: one id per row expected")
            return given
        return group_keys(ids, mask) if self.group_by == "prompt" else None

    def _zero_advantage(self, call, adv, mask: torch.Tensor, valid) -> dict[str, torch.Tensor]:
        """Groups whose advantages are all 0 (equal rewards: no gradient), from
        ``observe(advantages=)`` per sequence ``(B,)`` or per token ``(B, T)`` (rows in the
        order of ``mask``)."""
        zero = torch.zeros((), dtype=_F64, device=mask.device)
        if adv is None:
            return {"zero_advantage_fraction": zero, "zero_advantage_fraction_count": zero}
        adv = to_device(torch.as_tensor(adv), mask.device)
        B, T = mask.shape
        if adv.ndim == 2 and adv.shape[1] > T:
            adv = adv[:, adv.shape[1] - T :]
        if adv.shape not in ((B,), (B, T)):
            raise call.error(f"advantages of shape {tuple(adv.shape)}: expected ({B},) or {(B, T)}")
        moving = adv.abs() > _ZERO
        flat = moving if adv.ndim == 1 else (moving & mask).any(1)
        groups = flat.reshape(-1, self.group_size).any(1)  # a group with any non-zero advantage
        counted = torch.ones_like(groups) if valid is None else valid
        return {
            "zero_advantage_fraction": (~groups & counted).sum().to(_F64),
            "zero_advantage_fraction_count": counted.sum().to(_F64),
        }

    def readout(self, window) -> Readout:
        st = window["sums"]
        out = {
            name: (getattr(st, name) / getattr(st, f"{name}_count")).item()
            if getattr(st, f"{name}_count").item()
            else float("nan")
            for name in _METRICS
        }
        out["groups"], out["completions"] = st.groups.item(), st.completions.item()
        out["mixed_groups"] = st.mixed_groups.item()
        return Readout({self.key(k): v for k, v in out.items()})
