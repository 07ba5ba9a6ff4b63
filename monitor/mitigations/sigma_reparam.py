"""σReparam (Zhai et al. 2023, apple/ml-sigma-reparam), METRICS.md 3.3."""

from __future__ import annotations

import fnmatch
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .. import _dist
from .._modules import named_modules, resolve_modules
from .._sharding import fsdp_roots, is_fsdp_flattened, is_sharded
from ..contracts import Event
from ..hooks import Hook
from ..keys import MetricKey
from .base import Mitigation


class SigmaReparametrization(nn.Module):
    """``W_hat = gamma * W / sigma(W)``, a ``torch.nn.utils.parametrize`` parametrization.

    ``sigma(W) = v' W u`` from one power iteration per forward, under ``no_grad`` (the gradient
    flows through ``W`` only). The right singular vector ``u`` is a buffer initialised from an exact
    SVD and updated in training mode with gradients enabled (so inspecting the weight under
    ``no_grad``, as the monitor does, does not advance it). ``gamma`` is a learnable 1-element
    tensor initialised to ``sigma(W)``, so the module computes the same function when applied
    (the PyTorch reference's choice; its JAX speech code starts at 1).

    Args:
        weight: the ``(out, in)`` weight being reparametrised.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        if weight.ndim != 2:
            raise ValueError(f"σReparam needs a 2-D weight, got shape {tuple(weight.shape)}")
        with torch.no_grad():
            _, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
        self.register_buffer("u", vh[0].to(weight.dtype))
        # a 1-element tensor, not a scalar: FSDP shards parameters along their first dimension
        self.gamma = nn.Parameter(s[:1].to(weight.dtype).clone())

    def sigma(self, weight: torch.Tensor) -> torch.Tensor:
        update = self.training and torch.is_grad_enabled()
        with torch.no_grad():
            v = F.normalize(weight @ self.u, dim=0)
            u = F.normalize(weight.T @ v, dim=0)
            if update:
                self.u.copy_(u)
        return torch.einsum("c,cd,d->", v, weight, u)

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
    if parametrize.is_parametrized(module, name):
        raise ValueError(f"{type(module).__name__}.{name} is already parametrized")
    with _no_self_set():
        parametrize.register_parametrization(module, name, SigmaReparametrization(weight))
    return module


@contextmanager
def _no_self_set():
    """``register_parametrization`` calls ``weight.set_(weight)`` (a no-op on the data) when the
    parametrization has no ``right_inverse``; that replaces the weight's gradient accumulator, so a
    ``DistributedDataParallel`` wrapper built earlier stops seeing its gradients. Skip the self-set."""
    original = parametrize._maybe_set

    def maybe_set(dest, src):
        if dest is not src:
            original(dest, src)

    parametrize._maybe_set = maybe_set
    try:
        yield
    finally:
        parametrize._maybe_set = original


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


class SigmaReparam(Mitigation):
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

    def __init__(
        self,
        module: str,
        when: str = "start",
        rule: str | None = None,
        all_linear: bool = False,
        optimizer: torch.optim.Optimizer | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        if when not in ("start", "rule"):
            raise ValueError(f"when must be 'start' or 'rule', got {when!r}")
        self.module = module
        self.when = when
        self.rule = rule
        self.all_linear = all_linear
        self.optimizer = optimizer
        self.applied: list[str] = []  # "<module path>:<parameter name>", in application order
        self.param_order: list[str] | None = None  # model.named_parameters() before any change
        self.announced = False  # the application at start is logged as an event at the first log
        self._pending: list[tuple[nn.Parameter, nn.Parameter]] = []  # (gamma, original weight)

    def __repr__(self) -> str:
        return f"SigmaReparam(module={self.module!r}, when={self.when!r}, name={self.name!r})"

    def attach(self, setup) -> None:
        super().attach(setup)
        self.model, self.process_group = setup.model, setup.process_group
        self.targets = resolve_modules(self.model, self.module, owner=repr(self))
        if not any(_attention_weights(p, m, self.all_linear) for p, m in self.targets):
            raise ValueError(
                f"{self!r}: no attention projection (nn.Linear or transformers Conv1D under an "
                f"'*attn*' path, nn.MultiheadAttention) in {[p for p, _ in self.targets]}; select "
                "the attention modules or pass all_linear=True"
            )
        if self.when == "rule" and self.rule is None:
            from ..probes.attention import AttentionEntropy

            names = [p.name for p in setup.probes.values() if isinstance(p, AttentionEntropy)]
            if len(names) != 1:
                raise ValueError(
                    f"{self!r}: pass rule=; the monitor has AttentionEntropy probes {names}"
                )
            (spec,) = (s for s in AttentionEntropy.rules if s.name == "entropy_collapse")
            self.rule = spec.bind(names[0]).name
        if self.when == "start":
            self._apply_to(self.targets, sync_grads=False)

    def _apply_to(self, roots, sync_grads: bool) -> list[str]:
        """Apply to the projections under ``roots``; the entries read back as parametrized."""
        found = [
            w
            for root_path, root in roots
            for w in _attention_weights(root_path, root, self.all_linear)
        ]
        done = [
            f"{path}:{pname}"
            for path, mod, pname in found
            if self._apply_one(path, mod, pname, sync_grads)
            and parametrize.is_parametrized(mod, pname)
        ]
        self._register(self.optimizer)
        return done

    def _apply_one(self, path: str, mod: nn.Module, pname: str, sync_grads: bool) -> bool:
        if parametrize.is_parametrized(mod, pname):
            return False
        weight = getattr(mod, pname, None)
        if is_sharded(weight) or is_fsdp_flattened(weight) or fsdp_roots(self.model):
            raise RuntimeError(
                f"{self!r}: '{path}' is already sharded by FSDP, which cannot take the new "
                "gamma parameter; apply σReparam before sharding: under FSDP2 build the monitor "
                "(when='start') before fully_shard; under FullyShardedDataParallel call "
                "collapse_monitor.mitigations.sigma_reparam(module) on the projections before "
                "wrapping"
            )
        if self.param_order is None:
            self.param_order = [n for n, _ in self.model.named_parameters()]
        sigma_reparam(mod, pname)
        gamma = getattr(mod.parametrizations, pname)[0].gamma
        group = self.process_group
        if sync_grads and _dist.is_distributed(group):
            # a DDP wrapper built before this parameter existed does not average its gradient;
            # the hook stays with the parametrization (it is part of the mitigation)
            world = _dist.world_size(group)
            gamma.register_hook(Hook(lambda g: _dist.all_reduce_sum_(g.clone(), group) / world))
        self._pending.append((gamma, getattr(mod.parametrizations, pname).original))
        self.applied.append(f"{path}:{pname}")
        return True

    def _register(self, optimizer) -> None:
        if optimizer is None or not self._pending:
            return
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for gamma, weight in self._pending:
            if id(gamma) in held:
                continue
            group = next(
                (g for g in optimizer.param_groups if any(p is weight for p in g["params"])), None
            )
            options = {k: v for k, v in (group or optimizer.defaults).items() if k != "params"}
            optimizer.add_param_group({"params": [gamma], **options})
        self._pending.clear()

    def after_log(self, view) -> list[Event]:
        self.optimizer = view.optimizer or self.optimizer
        events = []
        if self.when == "start" and self.applied and not self.announced:
            self.announced = True
            info = {"layers": list(self.applied), "when": "start"}
            events.append(Event(self.name, info, count=len(self.applied)))
        if self.when == "rule":
            layers = {MetricKey.parse(a.metric).layer for a in view.alerts if a.rule == self.rule}
            modules = named_modules(self.model)
            chosen = [
                (q, modules[q])
                for q in sorted(layer for layer in layers if layer is not None)
                if q in modules and any(q == p or q.startswith(p + ".") for p, _ in self.targets)
            ]
            done = self._apply_to(chosen, sync_grads=True) if chosen else []
            if done:
                info = {"layers": done, "when": f"rule {self.rule}"}
                events.append(Event(self.name, info, count=len(done)))
        self._register(self.optimizer)
        return events

    def state_dict(self) -> dict:
        return {
            "applied": list(self.applied),
            "param_order": self.param_order,
            "announced": self.announced,
        }

    def adopt_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Give a freshly built optimizer the param groups of the original run: rule-applied
        ``gamma`` parameters in groups of their own, in application order (a resumed run's
        ``configure_optimizers`` sees them among the model's parameters)."""
        if self.when != "rule" or not self.applied:
            return
        modules = named_modules(self.model)
        gammas = []
        for entry in self.applied:
            path, pname = entry.rsplit(":", 1)
            plist = getattr(modules[path].parametrizations, pname)
            gammas.append((plist[0].gamma, plist.original))
        ids = {id(g) for g, _ in gammas}
        # parametrize moved each weight after its module's other parameters: put every group
        # back in the order the original run's optimizer had (its state is matched by position)
        rank = {n: i for i, n in enumerate(self.param_order or [])}
        position = {
            id(p): rank.get(
                n.replace(".parametrizations.", ".").removesuffix(".original"), len(rank)
            )
            for n, p in self.model.named_parameters()
        }
        for group in optimizer.param_groups:
            kept = [p for p in group["params"] if id(p) not in ids]
            group["params"] = sorted(kept, key=lambda p: position.get(id(p), len(rank)))
        self._pending = gammas
        self._register(optimizer)

    def on_step(self, optimizer) -> None:
        if optimizer is not None:
            self.optimizer = optimizer
            self._register(optimizer)

    def restore_structure(self, state: dict) -> None:
        """Re-apply σReparam to the layers a checkpoint recorded, in the original order (so the
        optimizer's param groups match)."""
        modules = named_modules(self.model)
        self.param_order = state.get("param_order") or self.param_order
        self.announced = bool(state.get("announced", self.announced))
        self.applied = []
        for entry in state.get("applied", []):
            path, pname = entry.rsplit(":", 1)
            if path not in modules:
                raise KeyError(
                    f"{self!r}: checkpoint applied σReparam to '{path}', which no longer exists"
                )
            if not self._apply_one(path, modules[path], pname, sync_grads=self.when == "rule"):
                self.applied.append(entry)

    def load_state_dict(self, state: dict, optimizer=None) -> None:
        self.optimizer = optimizer or self.optimizer
        self.restore_structure(state)
        self._register(self.optimizer)
