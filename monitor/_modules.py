"""Resolving module paths and globs against a model's module names, wrappers left out."""

from __future__ import annotations

import difflib
import fnmatch
import logging
import sys

from torch import nn

log = logging.getLogger(__name__)

# the attribute under which a wrapper keeps the module it wraps: FSDP (first generation),
# activation checkpointing, torch.compile (OptimizedModule); DDP's ``module`` is only a wrapper
# segment under DistributedDataParallel / DataParallel
_WRAPPER_ATTRIBUTES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")
_DATA_PARALLEL = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def named_modules(model: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """``model.named_modules()`` under the names the unwrapped model gives them: the segments
    that FSDP, activation checkpointing, ``torch.compile``, DDP, DeepSpeed's engine and PEFT
    (``base_model.model``) insert are dropped, and a name
    a wrapper shares with the module it wraps names the wrapped module. ``prefix`` is the
    model's own name."""
    out: dict[str, nn.Module] = {}
    seen: set[int] = set()

    wrappers = _peft_wrappers() + _deepspeed_engine()  # (class, attribute of the wrapped)

    def visit(module: nn.Module, name: str) -> None:
        if id(module) in seen:  # a module shared by two parents is listed once, as torch does
            return
        seen.add(id(module))
        out[name] = module  # a wrapper's inner module, visited next, takes over its name
        inner = "module" if isinstance(module, _DATA_PARALLEL) else None
        for cls, attr in wrappers:
            if isinstance(module, cls):
                inner = attr
        for attr, child in module.named_children():
            if attr in _WRAPPER_ATTRIBUTES or attr == inner:
                visit(child, name)
            else:
                visit(child, f"{name}.{attr}" if name else attr)

    visit(model, prefix)
    return out


def _peft_wrappers() -> list[tuple[type, str]]:
    """PEFT's wrapper classes and the attribute that holds what they wrap: a ``PeftModel``'s
    ``base_model`` (the tuner), a tuner's ``model`` (the user's model). Empty unless ``peft`` was
    imported (a model cannot be wrapped by it otherwise)."""
    if "peft" not in sys.modules:
        return []
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    return [(PeftModel, "base_model"), (BaseTuner, "model")]


def _deepspeed_engine() -> list[tuple[type, str]]:
    """DeepSpeed's engine, whose ``module`` is the user's model (a data-parallel wrapper);
    empty unless ``deepspeed`` was imported."""
    if "deepspeed" not in sys.modules:
        return []
    from deepspeed import DeepSpeedEngine

    return [(DeepSpeedEngine, "module")]


def _without_peft_prefix(model: nn.Module, pattern: str, named: dict[str, nn.Module]) -> str:
    """``pattern`` without PEFT's ``base_model.model.`` after a ``PeftModel``: at the start for
    the model itself, or after the path of one held deeper (a trainer module's ``self.model``)."""
    wrappers = tuple(c for c, _ in _peft_wrappers())
    prefix = "base_model.model."
    if not wrappers or prefix not in pattern:
        return pattern
    if pattern.startswith(prefix) and isinstance(model, wrappers):
        return pattern[len(prefix) :]
    # (under the wrappers' own name the user's model is listed, their segments being dropped)
    wrapped = {id(w.get_base_model()) for w in model.modules() if isinstance(w, wrappers[0])}
    at = pattern.find("." + prefix)
    while at != -1:
        if id(named.get(pattern[:at])) in wrapped:
            return pattern[: at + 1] + pattern[at + 1 + len(prefix) :]
        at = pattern.find("." + prefix, at + 1)
    return pattern


def _inside(name: str, names: set[str]) -> bool:
    """Whether a module named ``name`` lies inside one of ``names`` (a dotted prefix)."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in names for i in range(1, len(parts)))


class NotFound(KeyError, ValueError):
    """A module path, or a probe a mitigation needs, that is not in this model (under
    pipeline parallelism: on another stage). A ``KeyError`` (and a ``ValueError``: the error
    :func:`~collapse_monitor.mitigations.base.find_probe` has always raised)."""


def resolve_modules(model: nn.Module, pattern: str, owner: str = "") -> list[tuple[str, nn.Module]]:
    """Modules whose name (see :func:`named_modules`) equals ``pattern`` or matches it as a glob
    (``fnmatch``: ``*`` also matches dots, so ``"*.attn"`` finds every ``attn`` at any depth).
    A glob keeps the outermost modules it matches: ``"transformer.h.*"`` gives the 12 blocks of
    a GPT-2, not their 144 submodules too; deeper ones are named by a pattern ending in their
    own name (``"transformer.h.*.attn"``). What it left out is said in the log (INFO).
    On a PEFT model a path written with PEFT's prefix (``base_model.model.lm_head``) names the
    same module as the model's own path (``lm_head``), which it is reported under.

    Raises:
        NotFound: (a ``KeyError``) nothing matches; the message lists the closest existing names.
    """
    named = named_modules(model)
    pattern = _without_peft_prefix(model, pattern, named)
    if pattern in named:
        return [(pattern, named[pattern])]
    hits = [(n, m) for n, m in named.items() if n and fnmatch.fnmatchcase(n, pattern)]
    if hits:
        matched = {n for n, _ in hits}
        kept = [(n, m) for n, m in hits if not _inside(n, matched)]
        if len(kept) < len(hits):
            log.info(
                "collapse monitor: %s'%s' matches %d modules; kept the %d outermost (%s, ...), "
                "not the modules inside them",
                f"{owner}: " if owner else "",
                pattern,
                len(hits),
                len(kept),
                kept[0][0],
            )
        return kept
    names = [n for n in named if n]
    close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.3) or names[:10]
    who = f"{owner}: " if owner else ""
    raise NotFound(
        f"{who}no module named or matching '{pattern}' in {type(model).__name__}; "
        f"closest names: {close}"
    )


# models of transformers' causal-LM and image-text-to-text auto mappings whose loss takes the
# labels as they are (no shift inside: the decoders of encoder-decoder models, XLNet, XLM, ...),
# or that take none, read from their forward's source in transformers 5.25;
# tests/probes/test_conventions.py re-reads the installed version
_UNSHIFTED_LMS = frozenset(
    {
        "BartForCausalLM",
        "BigBirdPegasusForCausalLM",
        "BlenderbotForCausalLM",
        "BlenderbotSmallForCausalLM",
        "BlipForConditionalGeneration",
        "CpmAntForCausalLM",
        "DiffusionGemmaForBlockDiffusion",
        "Kosmos2ForConditionalGeneration",
        "Kosmos2_5ForConditionalGeneration",
        "PI05ForConditionalGeneration",
        "PI0ForConditionalGeneration",
        "Pix2StructForConditionalGeneration",
        "UdopForConditionalGeneration",
        "VisionEncoderDecoderModel",
        "Gemma4AssistantForCausalLM",
        "Gemma4UnifiedAssistantForCausalLM",
        "MBartForCausalLM",
        "MarianForCausalLM",
        "MusicgenForCausalLM",
        "MusicgenMelodyForCausalLM",
        "MvpForCausalLM",
        "PLBartForCausalLM",
        "PegasusForCausalLM",
        "ProphetNetForCausalLM",
        "TrOCRForCausalLM",
        "WhisperForCausalLM",
        "XLMWithLMHeadModel",
        "XLNetLMHeadModel",
    }
)


def causal_lm_names() -> frozenset[str]:
    """Class names of ``transformers``' causal LMs and image-text-to-text models (vision-language
    LMs such as Llava, which shift the labels of their text as a causal LM does)."""
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for mapping in (
        "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
        "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    ):
        for value in getattr(modeling_auto, mapping, {}).values():
            names.update(value if isinstance(value, (tuple, list)) else (value,))
    return frozenset(names)


def causal_lm(model: nn.Module, path: str) -> str | None:
    """The class name of the ``transformers`` causal language model holding the module ``path``
    (one of the names :func:`named_modules` gives), or None. Such a model (``*ForCausalLM``,
    ``GPT2LMHeadModel``, a vision-language LM such as ``LlavaForConditionalGeneration``, ...)
    takes unshifted ``labels`` and shifts them inside its loss: the logits or hidden state at
    position t belong to the label at t + 1. The outermost model that computes a loss decides:
    an encoder-decoder (``VisionEncoderDecoderModel`` with a GPT-2 decoder, ``EncoderDecoderModel``)
    pairs its decoder's position t with the label at t, whatever its decoder's own loss does."""
    if "transformers" not in sys.modules:  # no transformers model can be in it
        return None
    import transformers

    named = named_modules(model)
    names = causal_lm_names()
    parts = path.split(".") if path else []
    for i in range(len(parts) + 1):  # the outermost first
        module = named.get(".".join(parts[:i]))
        if not isinstance(module, transformers.PreTrainedModel):
            continue
        cls = type(module).__name__
        if cls in _UNSHIFTED_LMS or getattr(module.config, "is_encoder_decoder", False):
            return None
        if cls in names or cls.endswith("ForCausalLM"):
            return cls
    return None
