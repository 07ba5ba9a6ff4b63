"""The monitor's side of a probe: hooks, recording, the window's life, reduce, state, failures.

A :class:`ProbeDriver` runs one :class:`~collapse_monitor.probes.Probe` for the monitor. It
resolves the probe's modules, hooks them, reads and checks each recorded call's value, keeps the
probe's window (on the data's device, per module for a glob), counts calls and steps, reduces the
window across ranks for a readout, swaps windows for validation snapshots, saves and loads, and
isolates the probe's failures. The probe author never sees it; a probe that hooks otherwise
than one forward hook per module gets the small :class:`Recorder` face of it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import sys
import weakref
from typing import Any

import torch
from torch import nn

from .. import _dist, _tensor_parallel
from .._autocast import outside_autocast
from .._modules import named_modules, resolve_modules
from .._sharding import is_sharded
from ..contracts import Component, Readout, Recording, Setup
from ..hooks import HookSet
from ..reading import (
    KV_CACHE_KEYS,
    Call,
    Recorder,
    first_input,
    kv_cache,
    nonfinite,
    pipeline_placeholder_forward,
    unnested,
)
from ..stats import CallCounts, Window, WindowView
from .base import Probe, kept_apart, layer_name

log = logging.getLogger(__name__)
# the keywords of a model's forward that _keep_model_inputs reads
_MODEL_INPUTS = frozenset(
    {
        "attention_mask",
        "input_ids",
        "inputs_embeds",
        "decoder_attention_mask",
        "decoder_input_ids",
        "labels",
        "logits_to_keep",
        *KV_CACHE_KEYS,
    }
)


def _takes_model_inputs(signature: inspect.Signature | None) -> bool:
    """Whether a forward of this signature can be given an input the model pre-hook reads
    (unknown signature or ``**kwargs``: it can)."""
    if signature is None:
        return True
    return any(
        p.kind is p.VAR_KEYWORD or (p.name in _MODEL_INPUTS and p.kind is not p.VAR_POSITIONAL)
        for p in signature.parameters.values()
    )


def _signature(module: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(module.forward)
    except (TypeError, ValueError):  # a builtin or C forward: keywords only
        return None


def _a_model(module: nn.Module, signature: inspect.Signature | None) -> bool:
    """Whether a module is a model whose inputs the pre-hook reads: a ``transformers`` model
    (a vision encoder-decoder's forward names no ``attention_mask``), or a forward that names a
    language model's inputs."""
    transformers = sys.modules.get("transformers")
    if transformers is not None and isinstance(module, transformers.PreTrainedModel):
        return True
    names = ("attention_mask", "input_ids", "inputs_embeds")
    return signature is not None and any(
        p.name in names and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        for p in signature.parameters.values()
    )


def _input_modules(model: nn.Module, found) -> list[tuple[nn.Module, inspect.Signature | None]]:
    """The modules whose forward pre-hook reads the model's inputs (its ``attention_mask``...),
    with their signatures: the model itself when its forward can be given them, and unless it
    is a model itself (:func:`_a_model`), the outermost model on the way to each probed module:
    a transformers model inside a user's wrapper whose ``forward(batch)`` calls
    ``self.net(**batch)`` or inside a LightningModule, a PEFT model's base model (called alone
    after ``merge_and_unload()``), a DDP or compiled model's own. Never a module inside a model:
    its parts are called with other masks (an encoder-decoder's decoder), which would replace
    the model's."""
    signature = _signature(model)
    chosen = [(model, signature)] if _takes_model_inputs(signature) else []
    named = named_modules(model)  # ("": the model under its wrappers)
    if named.get("") is model and _a_model(model, signature):
        return chosen
    for path, _ in found:
        parts = path.split(".") if path else []
        for i in range(len(parts) + 1):
            module = named.get(".".join(parts[:i]))
            signature = None if module is None else _signature(module)
            if module is not None and _a_model(module, signature):
                if all(module is not m for m, _ in chosen):
                    chosen.append((module, signature))
                break
    return chosen


def _length(ids: Any, embeds: Any) -> int | None:
    """The tokens per sequence of a model call, from its ``(B, S)`` ids or ``(B, S, D)``
    embeddings (None when it has neither)."""
    if isinstance(ids, torch.Tensor) and ids.ndim == 2:
        return ids.shape[1]
    if isinstance(embeds, torch.Tensor) and embeds.ndim == 3:
        return embeds.shape[1]
    return None


def _decoder_from_labels(bound: dict) -> bool:
    """An encoder-decoder called with ``labels`` (2-D) and no decoder inputs, or the ones a
    seq2seq collator made from them: its decoder reads the labels shifted right."""
    labels, ids = bound.get("labels"), bound.get("decoder_input_ids")
    return (
        isinstance(labels, torch.Tensor)
        and labels.ndim == 2
        and (ids is None or getattr(ids, "shape", None) == labels.shape)  # (a collator's shift)
        and bound.get("decoder_inputs_embeds") is None
    )


class ProbeDriver(Component, Recorder):
    """Runs one probe for the monitor (see the module docstring).

    Attributes:
        probe: the probe.
        window: its statistics of the current window.
        observed_steps, window_steps: training steps it recorded, in all and in this window.
        rows_per_step: the samples its last recorded training step brought (host-known, for a
            class-conditional cadence), or None before one.
    """

    def __init__(self, probe: Probe) -> None:
        if not isinstance(probe, Probe):
            raise TypeError(f"probes must be Probe instances, got {type(probe).__name__}")
        super().__init__(probe.name)
        self.probe = probe
        self.hooks = HookSet()
        self.scopes: list[str | None] = [None]  # one window part per module of a glob
        self.window: Window | None = None
        self.device = torch.device("cpu")
        self.observed_steps = 0
        self.window_steps = 0
        self.rows_per_step: int | None = None
        self.last: Readout | None = None  # the last readout, identical on every rank
        # whether a training window's readout held a headline metric (then a window without
        # one is "silent"), and whether the last readout did
        self._spoke = self._speaks = False
        self._step_rows = 0
        self._modules: list[tuple[str, weakref.ref]] = []
        self._reduced: Window | None = None
        self._saved_window: Window | None = None
        self.model_inputs: dict = {}  # the model's attention_mask (and cache) of this forward
        self._said: set[str] = set()  # say_once's kinds
        self.skipped_generation = False  # left generation forwards out (and said so once)
        self._said_bad: set[str] = set()
        self._step_hooks = HookSet()  # gradient hooks of this step (Call.on_gradient)
        self._model_hooks = HookSet()  # on the model and the models inside it: never suspended
        self._armed: set[int] = set()
        self._microbatches: dict[str, dict[int, int]] = {}  # path: {micro-batch: rows} this step
        # the ranks holding the module, when only some do (pipeline stages; None: all)
        self.group = None
        self.tp = None  # the model's tensor parallelism (_tensor_parallel.TensorParallel)
        self.stopped = False  # disabled on every rank (agreed at a log)
        # under tensor parallelism, a probed activation's id: (id, whole features) of its
        # column-parallel feeders (attach), and a feeder's id: its last output
        self._fed: dict[int, list[tuple[int, int]]] = {}
        self._feeds: dict[int, weakref.ref] = {}
        self.slower = 1  # its cadence stride times this (an overhead budget's, agreed by ranks)

    def __repr__(self) -> str:
        return repr(self.probe)

    @property
    def recording(self) -> Recording:
        return self._recording

    # ----------------------------------------------------------------- attach
    def attach(self, setup: Setup, elsewhere_ok: bool = False) -> tuple[str, ...] | None:
        """Find the probe's modules and hook them. Returns their paths; with ``elsewhere_ok``
        (a distributed run, where another rank may hold them: a pipeline stage) a path that
        matches nothing returns None instead of raising.

        Raises:
            KeyError: nothing matches the probe's path (without ``elsewhere_ok``).
        """
        probe = self.probe
        self.strict = setup.strict
        self.tp = setup.tensor_parallel
        try:
            found = resolve_modules(setup.model, probe.module, owner=repr(probe))
        except KeyError:
            if elsewhere_ok:
                return None
            raise
        self._modules = [(path, weakref.ref(mod)) for path, mod in found]
        probe.paths = [path for path, _ in found]
        if kept_apart(probe):
            self.scopes = [layer_name(p) for p in probe.paths]
        self.device = _device_of(mod for _, mod in found)
        probe._driver = self
        probe.on_attach(setup, found)
        self.window = self._fresh_window()
        probe.attach_hooks(found, self)
        if self.tp is not None and probe.extract is None:
            named, hooked = named_modules(setup.model), set()
            for path, mod in found:
                fed = self.tp.feeders(named, path)
                for feeder, _ in fed:
                    if id(feeder) not in hooked:
                        hooked.add(id(feeder))
                        self.hooks.forward(feeder, self._keep_feed)
                if fed:
                    self._fed[id(mod)] = [(id(f), features) for f, features in fed]
        if probe.skips_generation and not probe.uses_token_mask:
            raise TypeError(
                f"{probe!r}: skips_generation needs uses_token_mask (the model's inputs)"
            )
        if probe.uses_token_mask:
            # (kept on while the probe's own hooks are off, never suspended: a trainer may
            # enter observe() inside the model's own forward, from a pre-hook, after PyTorch
            # read the model's pre-hooks; a model inside a wrapper is called after it)
            for module, signature in _input_modules(setup.model, found):
                capture = functools.partial(self._capture_model_inputs, signature)
                self._model_hooks.forward_pre(module, capture)
        return tuple(probe.paths)

    def _fresh_window(self) -> Window:
        if self.scopes == [None]:
            window = self.probe.new_window()
        else:
            window = Window.scoped({s: self.probe.new_window() for s in self.scopes})
        return window.add("_calls", CallCounts()).to(self.device)

    def view(self, scope: str | None = None, window: Window | None = None) -> WindowView:
        """One module's part of the window (``None``: the probe's only part)."""
        return WindowView(self.window if window is None else window, scope)

    def _scope(self, path: str) -> str | None:
        return None if self.scopes == [None] else layer_name(path)

    def detach(self) -> None:
        self._fed, self._feeds = {}, {}
        self.hooks.remove()
        self._model_hooks.remove()
        self._step_hooks.remove()
        self.end_recording()

    def end_recording(self) -> None:
        super().end_recording()
        self.model_inputs = {}

    def check_modules(self, named: dict[str, nn.Module]) -> None:
        """Raise if a module this probe hooks is no longer the one at its path.

        Args:
            named: ``dict(model.named_modules())`` of the model now.
        """
        for path, ref in self._modules:
            if named.get(path) is not ref():
                raise ValueError(
                    f"{type(self.probe).__name__} '{self.name}': module '{path}' is no longer part "
                    "of the model (it was replaced, wrapped or removed after the monitor was "
                    "built, e.g. by peft.get_peft_model); its hooks stay on the old module. Build "
                    "the monitor again on the changed model"
                )

    # ----------------------------------------------------------------- recording
    @property
    def active(self) -> bool:
        return self._active

    def read_forward(self, path: str, module: nn.Module) -> None:
        self.hooks.forward(module, functools.partial(self._on_forward, path))

    def _on_forward(self, path, module, args, kwargs, output) -> None:
        if self._active:
            self.guarded(self._read_and_record, Call(self, path, module, args, kwargs, output))
        elif self.tp is not None and self._gathering:  # failed here alone: gathers go on
            self._gather_only(Call(self, path, module, args, kwargs, output))

    @torch.compiler.disable
    def _gather_only(self, call: Call) -> None:
        """:meth:`_read_and_record` up to its gathers (see :attr:`_gathering`), skipped where
        :meth:`guarded` skips a call (a forward recomputed in the backward)."""
        if torch._C._current_graph_task_id() != -1:
            return
        with contextlib.suppress(Exception), torch.no_grad():
            self._read_and_record(call)

    def _keep_feed(self, module, args, kwargs, output) -> None:
        """The last output of a column-parallel module feeding a probed activation."""
        if (self._active or self._gathering) and isinstance(output, torch.Tensor):
            self._feeds[id(module)] = weakref.ref(output)

    def _fed_features(self, call: Call) -> int | None:
        """The whole features of a probed activation's call whose input is the very output of
        a column-parallel feeder (:meth:`TensorParallel.feeders`)."""
        given = first_input(call.args, call.kwargs)
        for feeder, features in self._fed.get(id(call.module), ()):
            kept = self._feeds.get(feeder)
            if kept is not None and kept() is given:
                return features
        return None

    @property
    def _gathering(self) -> bool:
        """Under tensor parallelism, a probe that failed on this rank still makes the gathers
        of the calls it would have recorded (:meth:`record`), until the ranks agree at a log
        that it stopped: the other ranks of its group wait in them."""
        return self.tp is not None and self._recording is not None and not self.stopped

    def _read_and_record(self, call: Call) -> None:
        probe = self.probe
        if probe.skips_generation and not probe.rollout and self.model_inputs.get("generating"):
            # a generation step inside a training observe() (an RL loop's generate()): its
            # positions are the prompt's and the sampler's, not the trained policy's tokens
            if not self.skipped_generation:
                self.skipped_generation = True
                log.warning(
                    "collapse monitor: %r leaves out generation forwards (a key-value cache, no "
                    "gradients); a rollout=True probe inside monitor.observe(rollout=True) "
                    "watches them",
                    probe,
                )
            return
        value = probe.reads.read(call, probe.extract, probe.read)
        self.record(value, call, _device_of_value(value))

    def call(self, path: str, module=None, args=(), kwargs=None, output=None) -> Call:
        return Call(self, path, module, args, kwargs, output)

    def record(self, value: Any, call: Call, device: torch.device | None) -> None:
        """Place the window on ``device`` (where the value lives), count the call and
        ``update`` the window (the module's part of it, for a glob kept per module).

        Under tensor parallelism a ``DTensor`` value, or a column-parallel module's local
        output slice, is gathered whole first (:meth:`TensorParallel.whole`, a collective of
        the tensor-parallel group, which runs this forward together).

        Raises:
            ValueError: a ``DTensor`` value in a model that had no tensor-parallel parameters
                when the monitor was built, or one that cannot be gathered exactly.
        """
        if pipeline_placeholder_forward():  # (no data: the stage's shape inference)
            return
        if self.tp is not None:
            where = None if self.probe.extract is not None else self.probe.read
            fed = self._fed_features(call) if where is not None else None
            value = self.tp.whole(value, call.module, call.path, where, self.probe, fed)
            if self.probe.whole_output:
                call.output = self.tp.whole(
                    call.output, call.module, call.path, "output", self.probe
                )
            self.probe.tp_gather(call)
            if not self._active:  # (only the gather: see _gathering)
                return
        elif is_sharded(value):
            raise ValueError(
                f"{self.probe!r} read a DTensor at '{call.path}' (placements "
                f"{tuple(value.placements)}), and the model had no tensor-parallel parameters "
                "when the monitor was built: build the monitor on the parallelised model"
            )
        if isinstance(value, torch.Tensor) and value.is_nested:
            if not self.probe.uses_token_mask:  # (its padding would count as samples)
                self._say_nested(call)
                return
            value, call.padding = unnested(value)
            given = call.recording.inputs.get("mask")
            if given is not None and not torch.equal(
                torch.as_tensor(given).bool().sum(1).cpu(), call.padding.sum(1).cpu()
            ):  # (a mask of other tokens than the padding cannot be placed in the packed rows)
                self._say_nested(call)
                return
        if device is not None:
            self.device = device  # where the data lives now (the model may have moved)
            self.window.to(device)
        flag = nonfinite(value)
        if flag is None:  # integer values (code indices): the module's own floating-point
            # output (a quantiser's quantized vectors), else its input, shows a NaN run
            flag = nonfinite(call.output)
            if flag is None:
                flag = nonfinite(first_input(call.args, call.kwargs))
        try:
            with outside_autocast(device):  # the forward's autocast would round its matmuls
                self.probe.update(self.view(self._scope(call.path)), value, call)
        finally:  # counted also when the update fails
            if call.nonfinite is not None:  # the probe's rows say what the elements may not
                flag = call.nonfinite if flag is None else flag | call.nonfinite
            # (a probe whose window reduces over a tensor-parallel group counts the group's
            # call once: on its first rank)
            if not (self.probe.tp_sharded and self.tp.coordinate):
                self.window["_calls"].add(self._recording.step, flag)
        if not self._recording.snapshot:
            self._step_rows += call.rows

    def _say_nested(self, call: Call) -> None:
        if "nested" not in self._said_bad:
            self._said_bad.add("nested")
            log.warning(
                "collapse monitor: %r leaves out the nested tensors of '%s' (the fast path of "
                "nn.TransformerEncoder in eval mode drops the padding so; this probe reads no "
                "padding mask, or observe(mask=) marks other tokens than the padding): build "
                "it with enable_nested_tensor=False to watch them",
                self.probe,
                call.path,
            )

    def on_gradient(self, tensor: torch.Tensor, fn) -> None:
        if id(tensor) not in self._armed:
            self._armed.add(id(tensor))
            self._step_hooks.tensor(tensor, functools.partial(self._on_gradient, fn))

    def _on_gradient(self, fn, grad) -> None:
        if not self.disabled:
            self.guarded(fn, grad, in_backward=True)

    def say_once(self, kind: str, what: str) -> None:
        """A warning naming the probe, once per ``kind`` (a module's path, a kind of input)."""
        if kind not in self._said:
            self._said.add(kind)
            log.warning("collapse monitor: %r: %s", self.probe, what)

    def warn_mask(self, path: str, mask: torch.Tensor, what: str) -> None:
        self.say_once(
            path,
            f"the model's attention_mask {tuple(mask.shape)} does not cover module '{path}' "
            f"({what}); its padding is not known there: pass observe(mask=...)",
        )

    def _capture_model_inputs(self, signature, module, args, kwargs) -> None:
        # (the forward's grad mode: guarded() runs without autograd)
        if self._active or (self.tp is not None and self._gathering):
            encoder_decoder = getattr(getattr(module, "config", None), "is_encoder_decoder", False)
            grad = torch.is_grad_enabled()
            self.guarded(self._keep_model_inputs, signature, args, kwargs, grad, encoder_decoder)

    def _keep_model_inputs(
        self,
        signature: inspect.Signature | None,
        args: tuple,
        kwargs: dict,
        grad: bool,
        encoder_decoder: bool = False,
    ) -> None:
        bound = dict(kwargs)
        if args and signature is not None:  # model(ids, mask): by position too
            try:
                bound = dict(signature.bind_partial(*args, **kwargs).arguments)
            except TypeError:
                pass
        mask = bound.get("attention_mask")
        cache = kv_cache(bound)
        generating = cache is not None and not grad
        # transformers' logits_to_keep = k: the head sees the last k positions (0: all)
        kept = bound.get("logits_to_keep")
        self.model_inputs = {"kept": kept, "cached": cache is not None, "generating": generating}
        if generating and hasattr(cache, "get_seq_length"):  # cached positions: 0 starts a call
            self.model_inputs["past_length"] = int(cache.get_seq_length())
        ids = bound.get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.ndim == 2 and ids.shape[1]:
            self.model_inputs["last_ids"] = ids[:, -1].detach()  # a generation step's last token
        # (the tokens of this call: with a cache, the last of the mask's positions)
        length = _length(ids, bound.get("inputs_embeds"))
        if length is not None:
            self.model_inputs["length"] = length
        if isinstance(mask, torch.Tensor) and mask.ndim == 2:
            self.model_inputs["attention_mask"] = mask.detach()
        if encoder_decoder:  # attention_mask is the encoder's; the decoder's is its own
            self.model_inputs["encoder_decoder"] = True
            self.model_inputs["decoder_length"] = _length(
                bound.get("decoder_input_ids"), bound.get("decoder_inputs_embeds")
            )
            mask = bound.get("decoder_attention_mask")
            if isinstance(mask, torch.Tensor) and mask.ndim == 2:
                self.model_inputs["decoder_attention_mask"] = mask.detach()
            elif _decoder_from_labels(bound):
                # transformers builds the decoder's input from labels (shift_tokens_right): a
                # position is padding where the label before it is -100 (seq2seq collators)
                labels = bound["labels"].detach()
                real = torch.ones_like(labels, dtype=torch.bool)
                real[:, 1:] = labels[:, :-1] != -100
                self.model_inputs["decoder_attention_mask"] = real
                self.model_inputs["decoder_length"] = labels.shape[1]

    # ----------------------------------------------------------------- steps and windows
    def microbatch_start(self, path: str, chunk: int, rows: int) -> int:
        """The first row of pipeline micro-batch ``chunk`` (``rows`` of them) in the step's
        whole batch, at module ``path`` (see :func:`~collapse_monitor.reading.aligned_targets`)."""
        seen = self._microbatches.setdefault(path, {})
        seen[chunk] = rows
        if all(k in seen for k in range(chunk)):
            return sum(seen[k] for k in range(chunk))
        return chunk * rows

    def _end_of_step(self) -> None:
        self._step_hooks.remove()  # one backward per step
        self._armed.clear()
        self._microbatches.clear()

    def finish_step(self) -> None:
        """After a training step in which this probe recorded."""
        self.observed_steps += 1
        self.window_steps += 1
        if self._step_rows and not self.probe.rank_local:
            # (a rank-local probe takes only the rows every rank agreed on, in exchange: ranks
            # that failed together then keep recording the same steps until a log stops them)
            self.rows_per_step = self._step_rows
        self._step_rows = 0
        self._end_of_step()
        for scope in self.scopes:
            self.probe.end_step(self.view(scope))

    def missed_step(self) -> None:
        """After a training step in which this probe would have recorded but was not observed."""
        self._end_of_step()
        for scope in self.scopes:
            self.probe.end_missed_step(self.view(scope))

    def exchange(self, group=None) -> None:
        """After every step this probe records, on every rank, whether it recorded, missed the
        step or is disabled: the probe's collectives of the hot path."""
        agreed = self.probe.exchange(self.window, group)
        if agreed is not None:
            self.rows_per_step = agreed

    def fingerprint(self) -> list[float]:
        """Numbers that differ when two ranks' reduced windows of the last readout do
        (:func:`~collapse_monitor._tensor_parallel.fingerprint`)."""
        return _tensor_parallel.fingerprint(self._reduced.state_dict())

    def step_values(self) -> dict[str | None, dict[str, torch.Tensor]]:
        """The probe's :meth:`Probe.step_values` of this step, per module scope."""
        return {scope: self.probe.step_values(self.view(scope)) for scope in self.scopes}

    def compute(self, group=None) -> Readout:
        """The readout of this window over all ranks; keeps the window. A collective under
        ``torch.distributed``: every rank must call it."""
        self._reduced = reduced = self.window.reduced(group)
        out = Readout()
        for scope in self.scopes:
            part = self.probe.readout(self.view(scope, reduced))
            out.incomplete |= part.incomplete
            for field in ("metrics", "histograms", "pictures", "masks"):
                mine = getattr(part, field)
                getattr(out, field).update(
                    mine if scope is None else {k.but(layer=scope): v for k, v in mine.items()}
                )
        out.metrics.update(self._health(reduced["_calls"], out))
        self._say_bad_input(out)
        self.last = out
        return out

    def _say_bad_input(self, out: Readout) -> None:
        """Say once per metric when a probe skipped rows for bad input in this window."""
        for k, v in out.metrics.items():
            if k.metric in self.probe.bad_input and v > 0 and k.metric not in self._said_bad:
                self._said_bad.add(k.metric)
                log.warning(
                    "collapse monitor: %r skipped %d rows of bad input in this window (%s, "
                    "counted in %s; the rest were recorded). Check the labels or indices it "
                    "reads; strict=True raises at the call",
                    self.probe,
                    v,
                    k.metric,
                    k,
                )

    def _health(self, counts: CallCounts, out: Readout) -> dict:
        """The probe's calls, the share of them whose input was mostly NaN or Inf (with the
        first step that was), and ``silent``: 1 when the probe ran in this window but reported
        none of its headline metrics although it did at an earlier log, and kept no sample
        (its inputs stopped being usable; a probe that reports ``samples`` and kept some only
        had a thin window)."""
        key, calls = self.probe.key, int(counts.calls)
        health = {key("calls"): float(calls)}
        if int(counts.nonfinite):
            health[key("nonfinite")] = int(counts.nonfinite) / calls
            health[key("first_nonfinite_step")] = float(counts.first_nonfinite)
        headline = self.probe.headline
        self._speaks = any(k.metric in headline and v == v for k, v in out.metrics.items())
        kept = any(k.metric == "samples" and v > 0 for k, v in out.metrics.items())
        if calls and self._spoke and not out.incomplete:
            health[key("silent")] = float(not (self._speaks or kept))
        return health

    def finish_window(self, group=None) -> None:
        """Start the next window after a log."""
        reduced = self._reduced if self._reduced is not None else self.window.reduced(group)
        self._reduced = None
        for scope in self.scopes:
            self.probe.end_window(self.view(scope), self.view(scope, reduced))
        self.window["_calls"].reset()
        self.window_steps = 0
        self._spoke |= self._speaks

    def replaced(self, scope: str | None, mask: torch.Tensor) -> None:
        """A mitigation replaced what ``mask`` marks in the module ``scope`` (None: the probe's
        only window part)."""
        self.probe.on_replaced(self.view(scope), mask)

    # ----------------------------------------------------------------- snapshots
    def begin_snapshot(self) -> None:
        """Record into a fresh window (sharing persistent memories) until :meth:`end_snapshot`."""
        self._saved_window = self.window
        self.window = self._fresh_window().share_persistent(self.window)

    def end_snapshot(self) -> None:
        self.window, self._saved_window = self._saved_window, None
        self._reduced = None

    # ----------------------------------------------------------------- state
    def state_dict(self, group=None, sync: bool = True) -> dict:
        """Window statistics (all-reduced over ``group`` when ``sync``: a collective) and extra
        state; with ``sync``, a probe's random ``generator`` of every rank (``generators``,
        gathered), so that each rank resumes its own draws from one rank's copy. During a
        validation snapshot, the training window is saved."""
        window = self._saved_window if self._saved_window is not None else self.window
        window = window.reduced(group) if sync else window
        extra = {
            "spoke": self._spoke,
            "observed_steps": self.observed_steps,
            "window_steps": self.window_steps,
            "rows_per_step": self.rows_per_step,  # a resumed cadence records the same steps
            "slower": self.slower,  # (and so does a budget's)
            **self.probe.extra_state(),
        }
        if sync and "generator" in extra and _dist.is_distributed(group):
            extra["generators"] = _dist.all_gather_object(extra["generator"], group)
        return {"identity": self.identity(), "window": window.state_dict(), "extra": extra}

    def identity(self) -> dict:
        """What the probe is, for a checkpoint to be refused by another probe of the same name:
        its class, module path and resolved paths, where it reads, its described parameters."""
        p = self.probe
        return {
            "kind": type(p).__name__,
            "module": p.module,
            "paths": list(p.paths),
            "read": p.read,
            **({"rollout": True} if p.rollout else {}),  # (another policy's window)
            **p.describe(),
        }

    def stage(self, state: dict, keep_window: bool = True) -> Window:
        """``state``'s window, checked against this probe and loaded into a fresh window:
        nothing of the probe changes (:meth:`apply` swaps it in).

        Raises:
            ValueError: the state is another probe's (the message names what differs), or a
                statistic's shape differs; KeyError: a statistic is missing.
        """
        mine, saved = self.identity(), state.get("identity")
        if saved != mine:
            diff = [
                f"{k}: {(saved or {}).get(k)!r} in the checkpoint, {mine.get(k)!r} here"
                for k in sorted(set(mine) | set(saved or {}))
                if (saved or {}).get(k) != mine.get(k)
            ]
            raise ValueError(
                f"{self.probe!r}: the checkpoint's state is not this probe's ({'; '.join(diff)}); "
                "nothing was loaded"
            )
        # the extra state a probe keeps now, it must find on load (keys kept only sometimes,
        # NC's lagged centres, are optional)
        needed = {"spoke", "observed_steps", "window_steps", *self.probe.extra_state()}
        missing = sorted(needed - set(state.get("extra", {})))
        if missing:
            raise KeyError(f"{self.probe!r}: the checkpoint lacks {missing}; nothing was loaded")
        window = self._fresh_window()
        try:
            window.load_state_dict(state["window"], keep=keep_window)
        except (KeyError, ValueError) as exc:
            raise type(exc)(f"{self.probe!r}: {exc}; nothing was loaded") from None
        return window

    def loaded_state(self) -> tuple:
        """What :meth:`apply` replaces, for :meth:`restore` (a load that fails part-way)."""
        counts = (self._spoke, self.observed_steps, self.window_steps, self.rows_per_step)
        return self.window, self._saved_window, counts, self.slower, self.probe.extra_state()

    def restore(self, kept: tuple) -> None:
        self.window, self._saved_window, counts, self.slower, extra = kept
        self._spoke, self.observed_steps, self.window_steps, self.rows_per_step = counts
        self.probe.load_extra_state(extra)

    def apply(self, state: dict, window: Window, rank: int = 0, reduced: bool = False) -> None:
        """Take a :meth:`stage` d window and ``state``'s other parts. ``rank``: this rank in the
        probe's group; ``reduced``: the state is one rank's for all (else this rank's own). The
        probe's extra state says whether its ``generator`` is this rank's
        (``generator_mine``): then it resumes those draws."""
        if self._saved_window is not None:  # (a snapshot is open: the training window)
            self._saved_window = window
        else:
            self.window = window
        extra = state["extra"]
        every = extra.get("generators")
        if every is not None and rank < len(every):
            extra = {**extra, "generator": every[rank], "generator_mine": True}
        elif "generator" in extra:  # a rank's own state (gathered, or not reduced), or rank 0's
            extra = {
                **extra,
                "generator_mine": extra.get("generator_mine", not reduced or rank == 0),
            }
        self._spoke = bool(extra["spoke"])
        self.observed_steps = int(extra["observed_steps"])
        self.window_steps = int(extra["window_steps"])
        self.rows_per_step = extra.get("rows_per_step")
        # (a budget's thinning, only where a budget keeps measuring: else it would stay)
        self.slower = int(extra.get("slower", 1)) if self.meter is not None else 1
        self.probe.load_extra_state(extra)


def _device_of(modules) -> torch.device:
    """Where a module's statistics should live: its first parameter's (or buffer's) device."""
    for mod in modules:
        for t in (*mod.parameters(), *mod.buffers()):
            return t.device
    return torch.device("cpu")


def _device_of_value(value: Any) -> torch.device | None:
    if isinstance(value, torch.Tensor):
        return value.device
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0].device
    return None
