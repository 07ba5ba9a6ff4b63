"""What σReparam and SimVQ share: a ``torch.nn.utils.parametrize`` reparametrisation of selected
weights, applied at start or when a rule fires, whose new parameters join the optimizer, whose
gradients are averaged over ranks when a DDP wrapper predates them, and which a resumed run
re-applies before loading the model."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import _dist
from .._modules import named_modules, resolve_modules
from .._sharding import fsdp_roots, is_fsdp_flattened, is_sharded
from ..contracts import Event
from ..hooks import Hook
from .base import Mitigation


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


def register(module: nn.Module, name: str, parametrization: nn.Module) -> nn.Module:
    """``register_parametrization`` that keeps the weight's gradient accumulator (DDP)."""
    if parametrize.is_parametrized(module, name):
        raise ValueError(f"{type(module).__name__}.{name} is already parametrized")
    with _no_self_set():
        parametrize.register_parametrization(module, name, parametrization)
    return module


class Reparametrization(Mitigation):
    """Base of mitigations that reparametrise weights (see the module doc).

    Subclasses say which weights (:meth:`weights`), how (:meth:`apply`, returning the new
    parameters), and which rule applies them by default (:meth:`default_rule`). A rule's alert
    names the layer it fired on (a per-layer metric), or none: then every selected module.
    """

    #: what the messages call it, and the function that applies it by hand
    what = "the reparametrisation"
    function = ""

    def __init__(
        self,
        module: str,
        when: str = "start",
        rule: str | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        if when not in ("start", "rule"):
            raise ValueError(f"when must be 'start' or 'rule', got {when!r}")
        self.module = module
        self.when = when
        self.rule = rule
        self.optimizers: tuple = () if optimizer is None else (optimizer,)
        self.applied: list[str] = []  # "<module path>:<parameter name>", in application order
        self.param_order: list[str] | None = None  # model.named_parameters() before any change
        self.announced = False  # the application at start is logged as an event at the first log
        self._tp = None  # the model's tensor-parallel layout (set at attach)
        # (new parameters, the original weight whose param group they join)
        self._pending: list[tuple[list[nn.Parameter], nn.Parameter]] = []

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(module={self.module!r}, when={self.when!r}, name={self.name!r})"
        )

    # ----------------------------------------------------------------- what subclasses say
    def weights(self, root_path: str, root: nn.Module) -> list[tuple[str, nn.Module, str]]:
        """``(path, module, parameter name)`` of the weights under ``root`` to reparametrise."""
        raise NotImplementedError

    def apply(self, module: nn.Module, name: str) -> list[nn.Parameter]:
        """Reparametrise ``module.<name>``; return the new parameters."""
        raise NotImplementedError

    def default_rule(self, setup) -> str:
        raise NotImplementedError

    def no_weights(self) -> str:
        """The error when the selected modules hold nothing to reparametrise."""
        return f"{self!r}: nothing to reparametrise in {[p for p, _ in self.targets]}"

    # ----------------------------------------------------------------- wiring
    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(path for path, _ in getattr(self, "targets", ()))

    def attach(self, setup) -> None:
        super().attach(setup)
        self.model, self.process_group = setup.model, setup.process_group
        self._tp = setup.tensor_parallel
        self.targets = resolve_modules(self.model, self.module, owner=repr(self))
        if not any(self.weights(p, m) for p, m in self.targets):
            raise ValueError(self.no_weights())
        if self.when == "rule" and self.rule is None:
            self.rule = self.default_rule(setup)
        if self.when == "start":
            self._apply_to(self.targets, sync_grads=False)

    def _apply_to(self, roots, sync_grads: bool) -> list[str]:
        """Apply to the weights under ``roots``; the entries read back as parametrized."""
        found = [w for root_path, root in roots for w in self.weights(root_path, root)]
        done = [
            f"{path}:{pname}"
            for path, mod, pname in found
            if self._apply_one(path, mod, pname, sync_grads)
            and parametrize.is_parametrized(mod, pname)
        ]
        self._register(self.optimizers)
        return done

    def _apply_one(self, path: str, mod: nn.Module, pname: str, sync_grads: bool) -> bool:
        if parametrize.is_parametrized(mod, pname):
            return False
        weight = getattr(mod, pname, None)
        placed = None if self._tp is None else self._tp.placed.get(path, {}).get(pname)
        if placed is None and getattr(mod, "_distribute_module_applied", False):
            placed = tuple(getattr(weight, "placements", ()))  # (parallelised after attach)
        if placed is not None:
            raise ValueError(
                f"{self!r}: '{path}' is tensor-parallel (its {pname} a DTensor with placements "
                f"{placed}): {self.what} is not applied to tensor-parallel layers (it would "
                "need the whole weight at every step); leave them out of the selection"
            )
        if is_sharded(weight) or is_fsdp_flattened(weight) or fsdp_roots(self.model):
            raise RuntimeError(
                f"{self!r}: '{path}' is already sharded by FSDP, which cannot take the new "
                f"parameters; apply {self.what} before sharding: under FSDP2 build the monitor "
                "(when='start') before fully_shard; under FullyShardedDataParallel call "
                f"{self.function}(module) before wrapping"
            )
        if self.param_order is None:
            self.param_order = [n for n, _ in self.model.named_parameters()]
        new = self.apply(mod, pname)
        group = self.process_group
        if sync_grads and _dist.is_distributed(group):
            # a DDP wrapper built before these parameters existed does not average their
            # gradients; the hooks stay with the parametrization (they are part of the mitigation)
            world = _dist.world_size(group)
            for p in new:
                p.register_hook(Hook(lambda g: _dist.all_reduce_sum_(g.clone(), group) / world))
        self._pending.append((new, getattr(mod.parametrizations, pname).original))
        self.applied.append(f"{path}:{pname}")
        return True

    def _new_parameters(self, entry: str) -> tuple[list[nn.Parameter], nn.Parameter]:
        path, pname = entry.rsplit(":", 1)
        plist = getattr(named_modules(self.model)[path].parametrizations, pname)
        return list(plist[0].parameters()), plist.original

    def _register(self, optimizers) -> None:
        """The new parameters join the optimizer that holds their original weight (the first
        one when none does), in a group with that weight's options."""
        if not optimizers or not self._pending:
            return
        held = {id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]}
        for new, weight in self._pending:
            new = [p for p in new if id(p) not in held]
            if not new:
                continue
            groups = [
                (opt, g)
                for opt in optimizers
                for g in opt.param_groups
                if any(p is weight for p in g["params"])
            ]
            optimizer, group = groups[0] if groups else (optimizers[0], None)
            options = {k: v for k, v in (group or optimizer.defaults).items() if k != "params"}
            optimizer.add_param_group({"params": new, **options})
        self._pending.clear()

    # ----------------------------------------------------------------- action
    def after_log(self, view) -> list[Event]:
        self.optimizers = view.optimizers or self.optimizers
        events = []
        if self.when == "start" and self.applied and not self.announced:
            self.announced = True
            info = {"layers": list(self.applied), "when": "start"}
            events.append(Event(self.name, info, count=len(self.applied)))
        if self.when == "rule":
            fired = [a for a in view.alerts if a.rule == self.rule]
            layers = {a.metric.layer for a in fired}
            modules = named_modules(self.model)
            if None in layers:  # a metric of the whole probe: every selected module
                chosen = list(self.targets) if fired else []
            else:
                chosen = [
                    (q, modules[q])
                    for q in sorted(layers)
                    if q in modules
                    and any(q == p or q.startswith(p + ".") for p, _ in self.targets)
                ]
            done = self._apply_to(chosen, sync_grads=True) if chosen else []
            if done:
                info = {"layers": done, "when": f"rule {self.rule}"}
                events.append(Event(self.name, info, count=len(done)))
        self._register(self.optimizers)
        return events

    def on_step(self, view) -> None:
        if view.optimizers:
            self.optimizers = view.optimizers
            self._register(self.optimizers)

    # ----------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        return {
            "applied": list(self.applied),
            "param_order": self.param_order,
            "announced": self.announced,
        }

    def adopt_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Give a freshly built optimizer the param groups of the original run: rule-applied
        parameters in groups of their own, in application order (a resumed run's
        ``configure_optimizers`` sees them among the model's parameters)."""
        if self.when != "rule" or not self.applied:
            return
        added = [self._new_parameters(entry) for entry in self.applied]
        ids = {id(p) for new, _ in added for p in new}
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
        self._pending = added
        self._register((optimizer,))

    def restore_structure(self, state: dict) -> None:
        """Re-apply to the weights a checkpoint recorded, in the original order (so the
        optimizer's param groups match)."""
        modules = named_modules(self.model)
        self.param_order = state.get("param_order") or self.param_order
        self.announced = bool(state.get("announced", self.announced))
        self.applied = []
        for entry in state.get("applied", []):
            path, pname = entry.rsplit(":", 1)
            if path not in modules:
                raise KeyError(
                    f"{self!r}: checkpoint applied the {self.what} to '{path}', which no longer "
                    "exists"
                )
            if not self._apply_one(path, modules[path], pname, sync_grads=self.when == "rule"):
                self.applied.append(entry)

    def load_state_dict(self, state: dict, optimizers=()) -> None:
        self.optimizers = tuple(optimizers) or self.optimizers
        self.restore_structure(state)
        self._register(self.optimizers)
