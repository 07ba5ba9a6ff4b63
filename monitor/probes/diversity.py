"""Diversity of the completions sampled for one prompt (docs/metrics.md#generationdiversity):
a policy that collapses samples the same completion for every draw of a group."""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

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


def _groups(keys: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An order of the rows (``(R,)``, ``R = B`` rounded up to ``size``; indices ``>= B`` name
    padding rows) in which the rows of each key come together in groups of ``size``, the full
    groups first, and ``(R / size,)`` bool: the groups that are full (a key with a number of rows
    that is not a multiple of ``size`` leaves its remainder out). Fixed-size tensor work only
    (no host sync)."""
    B = keys.shape[0]
    R = -(-B // size) * size
    keys, by_key = torch.sort(keys, stable=True)
    position = torch.arange(B, device=keys.device)
    starts = torch.ones(B, dtype=torch.bool, device=keys.device)
    starts[1:] = keys[1:] != keys[:-1]
    run = starts.cumsum(0) - 1  # the key's run
    rank = position - torch.where(starts, position, 0).cummax(0).values  # place in its run
    length = torch.zeros(B, dtype=torch.int64, device=keys.device).scatter_add_(
        0, run, torch.ones_like(run)
    )[run]
    chunk = rank // size
    full = length - chunk * size >= size
    # full groups first, each (run, chunk) together; the rest after, in their order
    place = torch.where(full, run * B + chunk, B * B + position)
    order = by_key[torch.argsort(place, stable=True)]
    order = torch.cat([order, torch.arange(B, R, device=keys.device)])
    groups = full.sum() // size  # full groups (a tensor: no sync)
    valid = torch.arange(R // size, device=keys.device) < groups
    return order, valid


class GenerationDiversity(Probe):
    """Diversity within groups of completions sampled from one prompt (GRPO's ``num_generations``).

    Reads the token ids ``(B, T)`` a model is called with (its first input: ``input_ids``), in the
    training forward that scores the completions. The completion tokens: positions whose label is
    not ``ignore_index`` (``observe(targets=labels)``; TRL's GRPO passes its completion labels),
    else ``observe(mask=)``, else the model's ``attention_mask`` (the prompt then counts too).
    The groups: ``observe(groups=)`` ``(B,)`` ids when given; else, with ``group_by="prompt"``
    (default), rows whose tokens outside the completion are the same (one prompt: TRL shuffles a
    step's rows, so a prompt's completions are not in a row); with ``group_by="order"``, rows
    ``g * G .. g * G + G - 1``. The rows of a training step's calls are grouped together at
    the step's end (a prompt's completions may come over several micro-batches: TRL shuffles a
    generation batch, then splits it for gradient accumulation; a snapshot's, at its end); each
    prompt's rows are cut in groups of ``G``, and the rows left over (a prompt with a number of
    rows that is not a multiple of ``G``: its group split between ranks) are left out and
    counted, one ``mixed_groups`` per ``G`` of them.

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
        group_size: ``G``, completions per prompt.
        group_by: ``"prompt"`` or ``"order"`` (see above), when no ``observe(groups=)``.
        vocab_size: the token ids' range (default: the model's ``config.vocab_size``).
        ignore_index: the label of positions that are not completion tokens.

    Raises:
        ValueError: at attach, no ``vocab_size`` known.

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
        # this step's calls, per window (weakly: a discarded snapshot's go with it), until its
        # end; made at attach (it does not pickle: Lightning's ddp_spawn sends probes)
        self._pending: weakref.WeakKeyDictionary | None = None

    def on_attach(self, setup, found) -> None:
        self._pending = weakref.WeakKeyDictionary()
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
        moving = self._moving(call, call.keyword("advantages"), mask)
        # grouped at the step's end: a prompt's completions reach the model over several
        # micro-batches (TRL shuffles a generation batch, then splits it for accumulation)
        self._pending.setdefault(window["sums"], []).append((ids, mask, keys, moving))

    def end_step(self, window) -> None:
        self._flush(window)

    def _flush(self, window) -> None:
        """Group the rows of the step's calls (``keys``: a group id per row, ``None`` for
        ``group_by="order"``: consecutive rows) and add their sums to the window."""
        calls = self._pending.pop(window["sums"], [])
        if not calls:
            return
        G = self.group_size
        T = max(ids.shape[1] for ids, *_ in calls)
        ids = torch.cat([F.pad(c[0], (0, T - c[0].shape[1])) for c in calls])
        mask = torch.cat([F.pad(c[1], (0, T - c[1].shape[1])) for c in calls])
        B = ids.shape[0]
        if calls[0][2] is None:  # in order: rows g*G .. g*G + G - 1 (a last partial group)
            keys = torch.arange(B, device=ids.device) // G
        else:
            keys = torch.cat([c[2] for c in calls])
        order, valid = _groups(keys, G)  # (B rounded up to G,): rows, groups of G in a row
        pad = order.shape[0] - B  # (rows beyond B: empty, only in groups left out)
        ids = torch.cat([ids, ids.new_zeros(pad, T)])[order]
        mask = torch.cat([mask, mask.new_zeros(pad, T)])[order]
        sums = group_sums(ids, mask, G, int(self.vocab_size), valid)
        moving = [c[3] for c in calls]
        if any(m is None for m in moving):
            zero = torch.zeros((), dtype=_F64, device=ids.device)
            sums.update(zero_advantage_fraction=zero, zero_advantage_fraction_count=zero)
        else:
            moving = torch.cat([*moving, moving[0].new_zeros(pad)])[order]
            groups = moving.reshape(-1, G).any(1)  # a group with any non-zero advantage
            sums["zero_advantage_fraction"] = (~groups & valid).sum().to(_F64)
            sums["zero_advantage_fraction_count"] = valid.sum().to(_F64)
        sums["mixed_groups"] = (~valid).sum().to(_F64)
        window["sums"].add(sums)

    def _keys(self, call, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        given = call.keyword("groups")
        if given is not None:
            given = to_device(torch.as_tensor(given), ids.device).to(torch.int64)
            if tuple(given.shape) != (ids.shape[0],):
                raise call.error(f"groups of shape {tuple(given.shape)}: one id per row expected")
            return given
        return group_keys(ids, mask) if self.group_by == "prompt" else None

    def _moving(self, call, adv, mask: torch.Tensor) -> torch.Tensor | None:
        """``(B,)`` bool: rows with a non-zero advantage (``|A| > 1e-6``; equal rewards leave
        none), from ``observe(advantages=)`` per sequence ``(B,)`` or per token ``(B, T)``."""
        if adv is None:
            return None
        adv = to_device(torch.as_tensor(adv), mask.device)
        B, T = mask.shape
        if adv.ndim == 2 and adv.shape[1] > T:
            adv = adv[:, adv.shape[1] - T :]
        if adv.shape not in ((B,), (B, T)):
            raise call.error(f"advantages of shape {tuple(adv.shape)}: expected ({B},) or {(B, T)}")
        moving = adv.abs() > _ZERO
        return moving if adv.ndim == 1 else (moving & mask).any(1)

    def readout(self, window) -> Readout:
        self._flush(window)  # (a snapshot's calls: no step ends inside one)
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
