"""What a probe reads from a forward call, and the one wording of every reading error.

A probe declares a :class:`Reading`: where the value is by default (the module's input or
output, and how to find it inside a tuple, dict or distribution) and what it must be. A user
whose model does not follow the default convention passes ``extract(module, args, output)``;
either way the value is checked the same way, and a value that does not fit raises::

    <Probe> '<name>' at module '<path>': expected <what> as <where>, got <what it was>;
    pass extract=lambda module, args, output: <what>

Each recorded forward call reaches ``Probe.update`` as a :class:`Call`; the conventions that
pair a value with the rest of the batch are read here too: the labels that belong to its rows
(:func:`aligned_targets`, with a causal model's shift) and the padding of its tokens
(:func:`token_mask`, :func:`token_rows`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from .stats import to_device

if TYPE_CHECKING:
    from torch import nn

    from .contracts import Recording
    from .hooks import HookSet


def describe(obj: Any) -> str:
    """A short description of what a module returned: types, dtypes and shapes."""
    if isinstance(obj, torch.Tensor):
        return f"Tensor {obj.dtype} {tuple(obj.shape)}"
    if isinstance(obj, Mapping):
        return "dict(" + ", ".join(f"{k}={describe(v)}" for k, v in obj.items()) + ")"
    if isinstance(obj, (tuple, list)):
        return type(obj).__name__ + "(" + ", ".join(describe(v) for v in obj) + ")"
    return type(obj).__name__


def first_input(args: tuple, kwargs: dict) -> Any:
    """The module's first positional argument, or its first keyword argument."""
    if args:
        return args[0]
    return next(iter(kwargs.values()), None)


def same(value: Any) -> Any:
    return value


def first_tensor(value: Any) -> Any:
    """The value itself, or the first element of a tuple/list (transformer blocks return
    ``(hidden, ...)``)."""
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return value


def is_index(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and not (
        value.is_floating_point() or value.is_complex() or value.dtype == torch.bool
    )


def single_index_tensor(value: Any) -> Any:
    """The one integer tensor of an output (itself, or in a tuple/list/dict), else the output."""
    if isinstance(value, Mapping):
        found = [v for v in value.values() if is_index(v)]
    elif isinstance(value, (tuple, list)):
        found = [v for v in value if is_index(v)]
    else:
        return value
    return found[0] if len(found) == 1 else value


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """``(N,)`` bool: the rows of ``x (N, ...)`` without NaN or Inf (the others are counted and
    left out, never folded into a statistic)."""
    return torch.isfinite(x).flatten(1).all(1) if x.ndim > 1 else torch.isfinite(x)


def floating(min_ndim: int) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        return (
            isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim >= min_ndim
        )

    return check


@dataclass(frozen=True)
class Reading:
    """What a probe reads from each forward call of its module.

    Attributes:
        expect: what the value is, for messages (``"floating-point features (N, D)"``).
        check: ``check(value) -> bool``, the value fits.
        find: where the value is inside the module's input or output by default.
        hint: what ``extract`` should return, for messages.

    Example:
        >>> import torch
        >>> indices = Reading("code indices", is_index, find=single_index_tensor, hint="indices")
        >>> indices.find((torch.zeros(2, 3), torch.tensor([4, 1]), torch.zeros(())))
        tensor([4, 1])
    """

    expect: str
    check: Callable[[Any], bool]
    find: Callable[[Any], Any] = same
    hint: str = "<tensor>"

    def read(self, call: Call, extract=None, where: str = "output") -> Any:
        """The checked value of one call: ``extract(module, args, output)`` when given, else
        found in the module's ``where`` (``"input"`` or ``"output"``); ``ValueError`` naming
        probe, module and what it saw."""
        if extract is not None:
            raw = value = extract(call.module, call.args, call.output)
            source = "the value returned by extract"
        else:
            raw = first_input(call.args, call.kwargs) if where == "input" else call.output
            value = self.find(raw)
            source = f"the module's {where}"
        if not self.check(value):
            raise call.error(
                f"expected {self.expect} as {source}, got {describe(raw)}; "
                f"pass extract=lambda module, args, output: {self.hint}"
            )
        return value


class Call:
    """One forward call a probe records, as ``Probe.update`` receives it.

    Attributes:
        path: the module's path (a probe that reads several calls per module names them apart:
            ``blocks.0.attn.sdpa_1``).
        module: the module (``None`` when the value did not come from a module's hook).
        args, kwargs, output: the module's inputs and output.
        recording: the :class:`~collapse_monitor.contracts.Recording` of this forward pass
            (step, whether it logs, whether it is a validation snapshot, the ``observe()``
            keywords the probe declared).
        rows: the samples this call added; set by ``update`` where the cadence needs them
            (class-conditional probes: ``Sampling.classes``).
        nonfinite: set by :meth:`nonfinite_rows` (a 0-d bool tensor), or None.
        padding: ``(B, L)`` bool, true for real tokens, when the value came as a nested tensor
            (:func:`unnested`): the padding its sequences' lengths say, before any other mask.
    """

    def __init__(self, context, path: str, module=None, args=(), kwargs=None, output=None):
        self._context = context  # the probe's reading context (its driver)
        self.path = path
        self.module = module
        self.args = args
        self.kwargs = kwargs or {}
        self.output = output
        self.rows = 0
        self.nonfinite: torch.Tensor | None = None
        self.padding: torch.Tensor | None = None

    @property
    def recording(self) -> Recording:
        return self._context.recording

    def keyword(self, name: str) -> Any:
        """The ``observe(<name>=...)`` value of this forward pass (None when optional and
        absent, or not declared by the probe).

        Raises:
            ValueError: a required keyword is missing.
        """
        value = self.recording.inputs.get(name)
        if value is None and self._context.probe.keywords.get(name, False):
            raise self.error(f"needs {name}: call monitor.observe({name}=...)")
        return value

    def error(self, what: str) -> ValueError:
        """A ValueError naming the probe and the module."""
        return self._context.probe.error(self.path, what)

    @property
    def strict(self) -> bool:
        """Whether the monitor raises every error (``strict=True``): bad input is then looked
        for, at a host sync, by :meth:`bad_rows`."""
        return self._context.strict

    def bad_rows(self, bad: torch.Tensor, describe: Callable[[], str]) -> None:
        """``bad``: rows of this call the probe skips for bad input (a label out of range). A
        strict monitor raises ``describe()`` (a host sync: tests and debugging); otherwise the
        probe counts them in one of its ``bad_input`` metrics and goes on.

        Raises:
            ValueError: under ``strict``, when any row is bad (naming probe and module).
        """
        if self._context.strict and bool(bad.any()):
            raise self.error(describe())

    def nonfinite_rows(self, bad: torch.Tensor, among: torch.Tensor | None = None) -> None:
        """``bad (N,)``: rows of this call whose values hold NaN or Inf (of the rows ``among``
        that count; None: all). Most of them bad marks the call diverged, as most NaN elements
        would: one NaN column of an LM head leaves every logit row without a softmax while only
        ``1/V`` of the elements are NaN. No host sync."""
        count = bad.numel() if among is None else among.sum()
        self.nonfinite = bad.sum() * 2 > count

    def on_gradient(self, tensor: torch.Tensor, fn: Callable[[torch.Tensor], None]) -> None:
        """Call ``fn(grad)`` when this step's backward reaches ``tensor`` (once per step and
        tensor; failures are the probe's, like its hooks')."""
        self._context.on_gradient(tensor, fn)

    @property
    def model_inputs(self) -> dict:
        """What the model's own forward keywords say of this pass, for probes that read token
        padding: ``attention_mask`` ``(B, S)`` (when given), ``cached`` (a key-value cache),
        ``generating`` (a cache and no gradients: ``generate()``), ``kept``
        (``logits_to_keep``), ``last_ids`` ``(B,)`` (each sequence's last input token),
        ``length`` (input positions) and ``past_length`` (positions already in the cache);
        empty for a model without them."""
        return self._context.model_inputs


class Recorder:
    """What a probe that hooks its own way (:meth:`Probe.attach_hooks`) is handed.

    Attributes:
        hooks: the :class:`~collapse_monitor.hooks.HookSet` its hooks go in (removed at
            ``close()``).
        active: a plain bool, true while the monitor records for this probe (hooks test it
            first: outside ``observe()`` they do nothing).
    """

    hooks: HookSet
    active: bool

    def read_forward(self, path: str, module: nn.Module) -> None:
        """The default: a forward hook on ``module`` whose value :attr:`Probe.reads` reads."""
        raise NotImplementedError

    def call(self, path: str, module=None, args=(), kwargs=None, output=None) -> Call:
        """A :class:`~collapse_monitor.reading.Call` for a value found while recording."""
        raise NotImplementedError

    def record(self, value: Any, call: Call, device: torch.device | None) -> None:
        """Hand ``value`` of ``call`` to ``Probe.update`` (window placed on ``device``)."""
        raise NotImplementedError

    def guarded(self, fn, *args) -> Any:
        """Run ``fn(*args)`` from a hook: an error disables the probe instead of training."""
        raise NotImplementedError


def _stage_frame(*names: str):
    """The innermost frame of a ``torch.distributed.pipelining`` stage's method among ``names``
    on the call stack (the stage marks nothing on the module), or None; only once pipelining is
    imported."""
    if "torch.distributed.pipelining.stage" not in sys.modules:
        return None
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_name not in names:
        frame = frame.f_back
    return frame


def pipeline_placeholder_forward() -> bool:
    """Whether the running forward is ``torch.distributed.pipelining``'s metadata inference: the
    first schedule step of a stage without static shapes runs its module once more, on the
    first micro-batch (stage 0) or on placeholder tensors (later stages), to learn its outputs'
    shapes. Its rows are no data of the run. (torch < 2.10 named it ``_shape_inference``.)"""
    return _stage_frame("_forward_metadata_inference", "_shape_inference") is not None


def pipeline_chunk() -> int | None:
    """The micro-batch a ``torch.distributed.pipelining`` stage is running now (its
    ``forward_one_chunk``'s ``fwd_chunk_id``), or None outside a schedule (read only where a
    probe's labels do not fit its values: the whole batch's labels beside one micro-batch's)."""
    frame = _stage_frame("forward_one_chunk")
    chunk = None if frame is None else frame.f_locals.get("fwd_chunk_id")
    return None if chunk is None else int(chunk)


def nonfinite(value: Any, sample: int = 1024) -> torch.Tensor | None:
    """A 0-d bool tensor, true when most of ``sample`` evenly strided elements of one of the
    floating-point tensors of ``value`` (a tensor, a tuple, list or dict of them, or a
    :class:`Checked` naming them) are NaN or Inf: a run that diverged has them everywhere (a
    few bad rows are the probes' own business: skipped and counted). ``None`` when ``value``
    holds no floating-point tensor. No host sync.
    """
    flag = None
    for t in _floating(value):
        if t.numel():
            some = t if t.numel() <= sample else _strided_sample(t, sample)
            bad = torch.isfinite(some).sum() < (some.numel() + 1) // 2  # (most: bad)
            flag = bad if flag is None else flag | bad
    return flag


def _strided_sample(t: torch.Tensor, sample: int) -> torch.Tensor:
    """About ``sample`` evenly strided elements of ``t``, as a view (no copy): every ``k``-th
    element when ``t`` is contiguous, else every ``k_d``-th index along each dimension (a
    permuted activation's ``reshape(-1)`` would copy all of it)."""
    if t.is_contiguous():
        return t.view(-1)[:: max(1, t.numel() // sample)]
    # each dimension keeps about size ** a indices, a = log(sample) / log(numel): spread over
    # all of them (a bad batch element or channel is not the whole tensor)
    a = min(1.0, math.log(sample) / math.log(max(t.numel(), 2)))
    steps = [max(1, round(size / max(1.0, size**a))) for size in t.shape]
    sizes = [-(-size // step) for size, step in zip(t.shape, steps)]
    strides = [stride * step for stride, step in zip(t.stride(), steps)]
    return t.as_strided(sizes, strides, t.storage_offset())


class Checked:
    """A value a probe reads that is not a tensor, tuple or dict (attention's q and k, say):
    :meth:`checked` names the tensors in which a diverged run shows NaN or Inf."""

    def checked(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError


def _floating(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, Mapping):
        value = list(value.values())
    elif isinstance(value, Checked):
        value = value.checked()
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _floating(v)]
    return []


def feature_rows(values: torch.Tensor, call: Call, what: str = "features") -> None:
    """Refuse ``values`` that are not ``(N, D)`` or ``(B, T, D)`` with the feature axis last.

    Raises:
        ValueError: more dimensions (a convolutional map), naming the probe and module.
    """
    if values.ndim > 3:
        raise call.error(
            f"{what} of shape {tuple(values.shape)}: expected (N, D) or (B, T, D) with the "
            "feature axis last; pool or flatten convolutional maps first, or pass extract="
        )


def label_shift(
    model, paths: list[str], given: int | None, owner: str, keyword: str = "targets"
) -> int:
    """The shift ``s`` with which a probe on ``paths`` pairs values with ``observe(<keyword>=)``
    labels (see :func:`aligned_targets`): ``given`` when set; else, for the model's labels
    (``keyword="targets"``), 1 for modules inside a ``transformers`` causal LM that shifts them
    inside its loss (:func:`~collapse_monitor._modules.causal_lm`), 0 elsewhere; other keywords
    (``groups``) are the user's own and are not shifted.

    Raises:
        ValueError: the paths lie in models that shift differently.
    """
    from ._modules import causal_lm

    if given is not None:
        return int(given)
    if keyword != "targets":
        return 0
    shifts = {p: int(causal_lm(model, p) is not None) for p in paths}
    if len(set(shifts.values())) > 1:
        raise ValueError(f"{owner}: modules {shifts} align labels differently; pass target_shift=")
    return next(iter(shifts.values()), 0)


def label_index(value: Any) -> int:
    """``ignore_index`` of a probe that reads class labels, checked when it is built (``None``
    failed at the first call, switching the probe off)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"ignore_index must be an integer label (e.g. -100), got {value!r}")
    return value


def aligned_targets(
    values: torch.Tensor, call: Call, keyword: str = "targets", shift: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of ``values (..., D)`` and the ``observe(<keyword>=)`` labels that belong to them.

    ``shift = s > 0`` pairs ``values[..., :-s, :]`` with ``labels[..., s:]`` (the hidden state
    or logits at position t with the next token's label: pass unshifted ``labels``, as
    ``transformers`` models take them). (``TokenEntropy`` aligns its labels, masks and advantages
    itself: it also right-aligns them to logits of the last positions, ``logits_to_keep``.)

    Returns:
        ``(values (N, D), labels (N,) int64)`` on the values' device; labels None when the
        keyword is optional and absent.

    Inside a ``torch.distributed.pipelining`` schedule, labels of the whole batch beside one
    micro-batch's values are that micro-batch's rows: micro-batch ``k`` starts after the rows of
    micro-batches ``0 .. k-1`` this module saw in the step (``k`` times its own rows when it did
    not see them all: an even split).

    Raises:
        ValueError: labels that are not integers, or whose shape does not match.
    """
    labels = call.keyword(keyword)
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            if call._context.probe.keywords.get(keyword, True):
                raise call.error(
                    f"{keyword} must be integer class indices, got dtype {labels.dtype}"
                )
            # optional labels (LogitHealth's): soft targets (mixup) leave them out, the
            # metrics without labels stay
            call._context.say_once(
                "soft",
                f"{keyword} of dtype {labels.dtype} are not class indices: the metrics "
                "that need them are left out (the others are measured)",
            )
            labels = None
    if shift:
        if values.ndim < 3:
            raise call.error(f"a target shift needs (B, T, D) values, got {tuple(values.shape)}")
        values = values[..., :-shift, :]
        labels = None if labels is None else labels[..., shift:]
    rows = values.detach().reshape(-1, values.shape[-1])
    if labels is None:
        return rows, None
    batch = values.shape[0] if values.ndim > 1 else 0
    if (
        labels.ndim == values.ndim - 1 >= 1
        and labels.shape[0] > batch
        and tuple(labels.shape[1:]) == tuple(values.shape[1:-1])
        and (chunk := pipeline_chunk()) is not None
    ):  # a pipeline stage's micro-batch: its rows of the whole batch's labels
        start = call._context.microbatch_start(call.path, chunk, batch)
        labels = labels[start : start + batch]
    if tuple(labels.shape) != tuple(values.shape[:-1]):
        raise call.error(
            f"{keyword} of shape {tuple(labels.shape)} do not match values of shape "
            f"{tuple(values.shape)} (expected {tuple(values.shape[:-1])})"
        )
    return rows, to_device(labels.reshape(-1), rows.device).to(torch.int64)


KV_CACHE_KEYS = ("cache", "past_key_values")  # transformers 5.x's keyword, then 4.x's


def kv_cache(inputs: Mapping[str, Any]) -> Any:
    """The key-value cache a model's forward keywords carry (``transformers``: ``cache`` from
    5.x, ``past_key_values`` before), or None: with one, a generation step."""
    cache = inputs.get(KV_CACHE_KEYS[0])
    return inputs.get(KV_CACHE_KEYS[1]) if cache is None else cache


def keeps_last(call: Call, length: int) -> bool:
    """Whether the model was called with ``logits_to_keep = length`` (``transformers``): its head
    sees the last ``length`` positions, so a model-length mask or labels right-align to them."""
    kept = call.model_inputs.get("kept")
    return isinstance(kept, int) and not isinstance(kept, bool) and kept == length


def unnested(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A nested batch of sequences ``(B, L_b, ...)`` (``nn.TransformerEncoder``'s fast path in
    eval mode drops the padding so) as a zero-padded ``(B, L, ...)`` and a ``(B, L)`` bool mask,
    true for the real positions."""
    lengths = torch.tensor([t.shape[0] for t in x.unbind()], device=x.device)
    padded = torch.nested.to_padded_tensor(x, 0.0)
    return padded, torch.arange(padded.shape[1], device=x.device)[None, :] < lengths[:, None]


def token_mask(call: Call, batch: int, length: int, device: torch.device) -> torch.Tensor | None:
    """``(batch, length)`` bool, true for real tokens of the sequences a layer sees.

    From ``observe(mask=...)`` ``(B, S)`` (true or 1 for real tokens), else from the model's
    own ``attention_mask`` input (``transformers`` convention; by keyword or by position),
    right-aligned: a layer that sees ``length <= S`` positions sees the last ones (decoding
    with a key-value cache, or an LM head under ``logits_to_keep``). The model's mask is used
    only where it covers the layer: its length is the layer's, the call used a cache, or it
    kept the logits of the last ``length`` positions; elsewhere the monitor says once that
    ``observe(mask=)`` is needed, and every token counts. In an encoder-decoder the modules
    outside its encoder read ``decoder_attention_mask`` (none: no decoder padding). Under
    ``logits_to_keep = C + 1``, an ``observe(mask=)`` of ``C`` columns is a mask of the last
    ``C`` tokens (TRL's ``completion_mask``), whether the layer sees ``C + 1`` positions (the
    head) or the whole sequence (the backbone).

    Raises:
        ValueError: an ``observe(mask=)`` whose shape does not fit the layer's sequences.
    """
    mask, given = _padding_source(call)
    if mask is None:
        return None
    width = mask.shape[-1]
    fitted = given and mask.ndim == 2 and mask.shape[0] == batch and width < length
    if fitted and keeps_last(call, width + 1):
        # TRL's completion_mask (B, C) beside logits_to_keep = C + 1: a mask of the last C
        # tokens, those before them (the prompt) not counted; for the head's C + 1 positions
        # as for the backbone's whole sequence
        mask = torch.cat([mask.new_zeros(batch, length - width), mask], 1)
    kept = keeps_last(call, length)
    fits = mask.shape[0] == batch and mask.shape[1] >= length
    if given and (mask.ndim != 2 or not fits):
        raise call.error(
            f"observe(mask=) of shape {tuple(mask.shape)} for {batch} sequences of "
            f"{length} tokens: expected ({batch}, >= {length}), true for real tokens"
        )
    cached = call.model_inputs.get("cached", False)
    if not given and not (fits and (mask.shape[1] == length or cached or kept)):
        call._context.warn_mask(call.path, mask, f"{batch} sequences of {length} tokens")
        return None
    return to_device(mask[:, mask.shape[1] - length :], device).bool()


def token_rows(call: Call, entries: int, device: torch.device) -> torch.Tensor | None:
    """``(entries,)`` bool for values laid out token by token, ``(B, S, ...)`` or a router's
    ``(B*S, k)`` choices: true where the token is real (the padding of :func:`token_mask`,
    every entry of a token sharing its flag). None without padding, and for a decoding step
    with a key-value cache (its new tokens are real).

    Raises:
        ValueError: an ``observe(mask=)`` ``(B, S)`` that does not divide the values into
            ``B*S`` tokens.
    """
    mask, given = _padding_source(call)
    if mask is None:
        return None
    length = model_side(call)[1]
    if not given and length is not None and mask.shape[-1] > length:
        # a step with a key-value cache: its tokens are the mask's last (a decoding step's
        # (B*1, k) router choices would otherwise divide a (B, k) mask evenly)
        mask = mask[:, mask.shape[-1] - length :]
    if entries % mask.numel() == 0:
        rows = to_device(mask.reshape(-1), device).bool()
        return rows.repeat_interleave(entries // mask.numel())
    if given:
        raise call.error(
            f"observe(mask=) of shape {tuple(mask.shape)} does not divide the {entries} "
            "values of this module into its tokens"
        )
    if not call.model_inputs.get("cached", False):
        call._context.warn_mask(call.path, mask, f"{entries} values")
    return None


def _padding_source(call: Call) -> tuple[torch.Tensor | None, bool]:
    """The padding mask ``(B, S)`` and whether the user gave it (``observe(mask=)``; a nested
    value's own counts as given)."""
    if call.padding is not None:
        return call.padding, True
    mask = call.keyword("mask")
    if mask is not None:
        mask = torch.as_tensor(mask)
        if mask.ndim != 2:
            raise call.error(f"observe(mask=) must be (batch, tokens), got {tuple(mask.shape)}")
        return mask, True
    return model_side(call)[0], False


def model_side(call: Call) -> tuple[torch.Tensor | None, int | None]:
    """The model's padding mask ``(B, S)`` and the tokens of its call, for the side of an
    encoder-decoder the module is on (``transformers``' ``config.is_encoder_decoder``): a
    module whose path meets a part ending in ``encoder`` (``encoder``, ``text_encoder``)
    before one ending in ``decoder`` reads ``attention_mask`` and ``input_ids``; every other
    one (the decoder, even a BERT decoder's own ``bert.encoder``, and the LM head) reads
    ``decoder_attention_mask`` and ``decoder_input_ids``, or, called with ``labels`` alone, the
    positions whose decoder input comes from a label other than -100 (none of those: no
    decoder position is padding); a decoder-only model's, its own."""
    inputs = call.model_inputs
    if inputs.get("encoder_decoder"):
        parts = call.path.split(".")
        side = next((p[-7:] for p in parts if p.endswith(("encoder", "decoder"))), None)
        if side != "encoder":
            return inputs.get("decoder_attention_mask"), inputs.get("decoder_length")
    return inputs.get("attention_mask"), inputs.get("length")
