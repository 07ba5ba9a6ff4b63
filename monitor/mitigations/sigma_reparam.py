"""σReparam (Zhai et al. 2023, apple/ml-sigma-reparam), docs/metrics.md#attentionentropy."""

from __future__ import annotations

import fnmatch
import logging

import torch
import torch.nn.functional as F
from torch import nn

from .._adapters import refuse_adapted
from .._autocast import outside_autocast
from .._modules import named_modules
from .reparametrize import Reparametrization, register

log = logging.getLogger(__name__)
# torch.compiler.is_compiling from torch 2.3 on
_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling


class SigmaReparametrization(nn.Module):
    """``W_hat = gamma * W / sigma(W)``, a ``torch.nn.utils.parametrize`` parametrization.

    ``sigma(W) = v' W u`` from one power iteration per forward, under ``no_grad`` (the gradient
    flows through ``W`` only). The right singular vector ``u`` is a buffer initialised from an exact
    SVD and updated in training mode with gradients enabled (so inspecting the weight under
    ``no_grad``, as the monitor does, does not advance it), once per training forward under
    activation checkpointing too: the forward's recomputation during the backward pass computes
    the sigma the forward computed (a non-reentrant checkpoint's rerun used to advance ``u`` a
    second time and take the gradient at another sigma: after 5 SGD steps the output moved by
    3e-4 against the same run without checkpointing; where one module runs several checkpointed
    forwards in a step, only the last one's rerun is exact). ``gamma`` is a learnable 1-element
    tensor initialised to ``sigma(W)``, so the module computes the same function when applied
    (the PyTorch reference's choice; its JAX speech code starts at 1). ``sigma`` is computed in
    float32 at least, outside any autocast, and rounded to the weight's dtype, as ``gamma`` is:
    the ratio starts at exactly 1 in bfloat16 too (computed in bfloat16 from the SVD's value it
    moved the weights by up to 0.9%).

    Args:
        weight: the ``(out, in)`` weight being reparametrised.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        if weight.ndim != 2:
            raise ValueError(f"σReparam needs a 2-D weight, got shape {tuple(weight.shape)}")
        with torch.no_grad():
            _, _, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
        self.register_buffer("u", vh[0].to(weight.dtype))
        # a 1-element tensor, not a scalar: FSDP shards parameters along their first dimension;
        # the value the first forward's sigma has (the same u), so that the ratio is 1
        with torch.no_grad():
            start = self.sigma(weight.detach(), update=False).reshape(1)
        self.gamma = nn.Parameter(start.clone())
        # the u the latest advancing forward began at, until a recomputation of it has run
        self._start: torch.Tensor | None = None

    def sigma(self, weight: torch.Tensor, update: bool | None = None) -> torch.Tensor:
        """The spectral norm estimate ``v^T W u`` after one power iteration from ``u`` (which
        it advances in training mode with gradients on, unless ``update=False``), computed in
        float32 at least, in the weight's dtype. A forward run during the backward pass (an
        activation checkpoint's recomputation) computes the sigma its forward computed."""
        if update is None:
            update = self.training and torch.is_grad_enabled()
        # a forward inside a backward pass is a checkpoint's recomputation (compiled graphs
        # recompute without calling modules). A non-reentrant checkpoint's forward advanced u:
        # its rerun starts where it did and leaves u alone; a reentrant one's forward ran
        # without gradients and left u alone: its rerun advances u
        start, rerun = self.u, not _compiling() and torch._C._current_graph_task_id() != -1
        if rerun and self._start is not None:
            start, self._start, update = self._start, None, False
        w = weight.to(torch.promote_types(weight.dtype, torch.float32))
        # (an autocast around the model's forward would run these in bfloat16 again)
        with outside_autocast(w.device):
            with torch.no_grad():
                v = F.normalize(w @ start.to(w.dtype), dim=0)
                u = F.normalize(w.T @ v, dim=0)
                if update:
                    self._start = None if rerun else self.u.clone()
                    self.u.copy_(u)
            sigma = torch.einsum("c,cd,d->", v, w, u)
        return sigma.to(weight.dtype)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * (self.gamma / self.sigma(weight))


def sigma_reparam(module: nn.Module, name: str = "weight") -> nn.Module:
    """Reparametrise ``module.<name>`` as ``gamma * W / sigma(W)``; returns ``module``.

    The raw weight stays the same ``Parameter`` object (now at
    ``module.parametrizations.<name>.original``), so an optimizer's state for it stays valid;
    ``module.parametrizations.<name>[0].gamma`` is the new learnable gain (shape ``(1,)``).

    Args:
        module: a projection: ``nn.Linear`` (weight ``(out, in)``), ``transformers``' ``Conv1D``
            (GPT-2's, weight stored ``(in, out)``: the spectral norm is the same), or any module
            whose parameter ``name`` is a 2-D matrix (``nn.MultiheadAttention`` and
            ``"in_proj_weight"``).
        name: the parameter.

    Raises:
        TypeError: ``module.<name>`` is not a 2-D ``Parameter``.
        ValueError: it is already parametrized.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> lin = sigma_reparam(nn.Linear(4, 3))
        >>> gamma = lin.parametrizations.weight[0].gamma
        >>> bool(torch.isclose(torch.linalg.matrix_norm(lin.weight, 2), gamma))
        True
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, nn.Parameter) or weight.ndim != 2:
        shape = "" if weight is None else f" of shape {tuple(weight.shape)}"
        raise TypeError(
            f"sigma_reparam needs a 2-D weight matrix: {type(module).__name__}.{name} is "
            f"{type(weight).__name__}{shape}; pass name= for the module's projection matrix"
        )
    # (registering evaluates the parametrization once: without autograd, so that it leaves u,
    # and the first forward's sigma is gamma exactly: a float32 model under a bfloat16 autocast
    # rounds its weights anew on a change of one float32 step)
    with torch.no_grad():
        return register(module, name, SigmaReparametrization(weight))


def is_projection(module: nn.Module) -> bool:
    """A linear projection with a 2-D ``weight``: ``nn.Linear``, or ``transformers``' ``Conv1D``
    (GPT-2's attention and MLP layers)."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D" and isinstance(weight, nn.Parameter) and weight.ndim == 2
    )


def _attention_weights(
    root_path: str, root: nn.Module, all_linear: bool
) -> list[tuple[str, nn.Module, str]]:
    """(path, module, parameter name) of the projections σReparam applies to under ``root``."""
    out = []
    for path, mod in named_modules(root, root_path).items():
        if isinstance(mod, nn.MultiheadAttention) and mod._qkv_same_embed_dim:
            out.append((path, mod, "in_proj_weight"))
        elif is_projection(mod):
            inside_attention = any(
                fnmatch.fnmatchcase(part.lower(), pattern)
                for part in path.split(".")
                for pattern in ("*attn*", "*attention*")
            )
            if all_linear or inside_attention:
                out.append((path, mod, "weight"))
    return out


class SigmaReparam(Reparametrization):
    """Apply σReparam to the attention projections of selected layers, at start or by a rule.

    Args:
        module: path or glob of the layers (e.g. ``"blocks.*.attn"``). Reparametrised are the
            projections (``nn.Linear``, ``transformers``' ``Conv1D`` as in GPT-2, fused ``qkv``
            as one matrix, as the reference applies it) under them whose path contains
            ``attn``/``attention`` (all of them when the selected module itself is the
            attention), and ``nn.MultiheadAttention``'s packed ``in_proj_weight``;
            ``all_linear=True`` takes every projection.
        when: ``"start"`` (at attach: before DDP wrapping and before Lightning builds optimizers)
            or ``"rule"``: at a log where ``rule`` fired, only for the layers whose metric fired.
        rule: the rule name; default the ``entropy_collapse`` rule of the ``AttentionEntropy``
            probe (``"<probe name>/entropy_collapse"``).
        optimizer: where to add the new ``gamma`` parameters (also taken from ``monitor.step``):
            one param group per weight group, with that group's hyper-parameters; skipped when the
            optimizer already holds them (e.g. Lightning's ``configure_optimizers`` after a
            ``"start"`` application).
        name: see :class:`~collapse_monitor.mitigations.Mitigation` (default ``"sigma_reparam"``).

    Under DDP every rank applies it at the same step (decisions come from all-reduced metrics)
    and the result is identical (exact SVD of identical weights). Applied mid-training, the new
    ``gamma`` are unknown to a ``DistributedDataParallel`` wrapper, so their gradients are averaged
    by a hook. Resume: ``monitor.load_state_dict(state, optimizer=opt)`` re-applies σReparam to the
    recorded layers (and re-adds the param groups) — call it before loading the model and optimizer
    state. Each application, read back as registered, is an event ``sigma_reparam``.
    """

    kind = "sigma_reparam"
    what = "σReparam"
    function = "collapse_monitor.mitigations.sigma_reparam"

    def __init__(
        self,
        module: str,
        when: str = "start",
        rule: str | None = None,
        all_linear: bool = False,
        optimizer: torch.optim.Optimizer | None = None,
        name: str | None = None,
    ) -> None:
        self.all_linear = all_linear
        self._said_tied: set[str] = set()
        super().__init__(module, when, rule, optimizer, name)

    def weights(self, root_path: str, root: nn.Module) -> list[tuple[str, nn.Module, str]]:
        found = _attention_weights(root_path, root, self.all_linear)
        named = named_modules(root, root_path)
        refuse_adapted(named, [path for path, _, _ in found], repr(self))
        # a weight tied to another module's (GPT-2's head and embedding: one Parameter) is
        # left out: reparametrised in one place, the two uses' weights would drift apart
        # (one module registered twice, as weight sharing by reuse does, is no tie: both
        # uses go through the same parametrized module)
        names: dict[int, list[str]] = {}
        for path, mod in self.model.named_modules():
            for pname, param in mod._parameters.items():
                if param is not None:
                    names.setdefault(id(param), []).append(f"{path}.{pname}".lstrip("."))
        tied = [w for w in found if len(names.get(id(getattr(w[1], w[2])), ())) > 1]
        for path, mod, pname in tied:
            if f"{path}.{pname}" in self._said_tied:
                continue
            self._said_tied.add(f"{path}.{pname}")
            log.warning(
                "%r: %s is one Parameter with %s (tied): left out, as σReparam on one of "
                "its uses would untie them",
                self,
                f"'{path}.{pname}'",
                [n for n in names[id(getattr(mod, pname))] if n != f"{path}.{pname}"],
            )
        return [w for w in found if w not in tied]

    def no_weights(self) -> str:
        return (
            f"{self!r}: no attention projection (nn.Linear or transformers Conv1D under an "
            f"'*attn*' path, nn.MultiheadAttention) in {[p for p, _ in self.targets]}; select "
            "the attention modules or pass all_linear=True"
        )

    def default_rule(self, setup) -> str:
        names = [p.name for p in setup.probes.values() if p.is_a("AttentionEntropy")]
        if len(names) != 1:
            raise ValueError(
                f"{self!r}: pass rule=; the monitor has AttentionEntropy probes {names}"
            )
        return f"{names[0]}/entropy_collapse"  # its default rule's name

    def apply(self, module: nn.Module, name: str) -> list[nn.Parameter]:
        sigma_reparam(module, name)
        return [getattr(module.parametrizations, name)[0].gamma]
