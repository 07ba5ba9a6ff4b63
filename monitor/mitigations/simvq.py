"""SimVQ (Zhu et al. 2024, "Addressing Representation Collapse in Vector Quantized Models with One
Linear Layer"; vector-quantize-pytorch's ``SimVQ``): the codebook as a frozen basis times one
learned linear layer, so every code moves with every gradient step."""

from __future__ import annotations

import torch
from torch import nn

from .codebooks import find_codebook
from .reparametrize import Reparametrization, register


class SimVQParametrization(nn.Module):
    """``E -> C W + b``, a ``torch.nn.utils.parametrize`` parametrization of a codebook
    ``E (K, D)`` or ``(H, K, D)``.

    ``C`` (buffer ``frozen``) is the codebook at the switch, frozen; ``W (D, D)`` (``weight``)
    starts at the identity and ``b (D,)`` (``bias``) at zero, so the codebook, and with it the
    model's function, is unchanged when applied (exactly: ``C I + 0 = C`` in float32/float64
    arithmetic; a TF32 or autocast matmul rounds the codebook at the switch).
    Every code is ``c_k W + b``: one gradient step on ``W`` moves the whole codebook, including
    codes no input chose (SimVQ's remedy for codebook collapse). The original parameter stays in
    the graph times zero (value and gradient exactly 0), so a ``DistributedDataParallel`` wrapper
    built before the switch still finds it used; it no longer affects the model.

    Args:
        codebook: the codebook being reparametrised.
    """

    def __init__(self, codebook: torch.Tensor) -> None:
        super().__init__()
        D = codebook.shape[-1]
        self.register_buffer("frozen", codebook.detach().clone())
        self.weight = nn.Parameter(torch.eye(D, dtype=codebook.dtype, device=codebook.device))
        self.bias = nn.Parameter(torch.zeros(D, dtype=codebook.dtype, device=codebook.device))

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return self.frozen @ self.weight + self.bias + original.mul(0)


def simvq(module: nn.Module, name: str = "weight") -> nn.Module:
    """Reparametrise the learned codebook ``module.<name>`` as SimVQ's ``C W + b``; returns
    ``module``.

    Args:
        module: the module holding the codebook (an ``nn.Embedding``: ``name="weight"``;
            vector-quantize-pytorch's codebook with ``learnable_codebook=True``:
            ``module._codebook``, ``name="embed"``).
        name: the parameter, shaped ``(K, D)`` or ``(H, K, D)``.

    Raises:
        TypeError: ``module.<name>`` is not a learned ``(K, D)``/``(H, K, D)`` parameter (an EMA
            codebook is a buffer that no gradient reaches: SimVQ does not apply).
        ValueError: it is already parametrized.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> codes = nn.Embedding(16, 4)
        >>> before = codes.weight.detach().clone()
        >>> _ = simvq(codes)
        >>> bool(torch.equal(codes.weight, before)), codes.parametrizations.weight[0].weight.shape
        (True, torch.Size([4, 4]))
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, nn.Parameter) or weight.ndim not in (2, 3):
        shape = "" if weight is None else f" of shape {tuple(weight.shape)}"
        raise TypeError(
            f"SimVQ needs a learned codebook (K, D) or (H, K, D): {type(module).__name__}.{name} "
            f"is {type(weight).__name__}{shape} (an EMA codebook is a buffer no gradient reaches)"
        )
    return register(module, name, SimVQParametrization(weight))


class SimVQ(Reparametrization):
    """Reparametrise a quantiser's learned codebook as SimVQ's ``C W + b``, at start or when the
    codebook rule fires.

    At the switch ``C`` is the codebook as it is, ``W = I`` and ``b = 0``: the model computes the
    same function (exactly, in float32/float64 without TF32); from then on the whole codebook moves with
    ``W`` and ``b``, so codes no input chooses follow the encoder instead of dying. The new
    parameters join the optimizer in a param group of their own with the codebook's
    hyper-parameters.

    Args:
        module: path of the quantiser (e.g. ``"quantizer"``).
        codebook: the codebook relative to ``module`` (see
            :class:`~collapse_monitor.mitigations.ResetDeadCodes`); default: its only
            ``nn.Embedding``, else a parameter named ``embed``/``codebook``/``embedding``.
        when: ``"start"`` (at attach, before DDP wrapping and before Lightning builds the
            optimizers) or ``"rule"`` (at the first log where ``rule`` fired).
        rule: default the ``usage_below`` rule of the ``CodebookUsage`` probe on ``module``.
        optimizer: where the new parameters go (also taken from ``monitor.step``).
        name: see :class:`~collapse_monitor.mitigations.Mitigation` (default ``"simvq"``).

    Raises:
        TypeError: the codebook is not a learned parameter (EMA codebooks: use
            :class:`~collapse_monitor.mitigations.ResetDeadCodes`).

    Guarantees as :class:`~collapse_monitor.mitigations.SigmaReparam`: every rank applies it at
    the same log with identical values (``W = I``, ``b = 0``); applied after a DDP wrapper was
    built, the new parameters' gradients are averaged by a hook; ``monitor.load_state_dict(state,
    optimizer=opt)`` re-applies it before the model's weights are loaded. Do not combine with
    ``ResetDeadCodes`` on the same codebook (its writes would land in the computed codebook).
    """

    kind = "simvq"
    what = "SimVQ"
    function = "collapse_monitor.mitigations.simvq"

    def __init__(
        self,
        module: str,
        codebook: str | None = None,
        when: str = "start",
        rule: str | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        name: str | None = None,
    ) -> None:
        self.codebook_name = codebook
        super().__init__(module, when, rule, optimizer, name)

    def weights(self, root_path: str, root: nn.Module) -> list[tuple[str, nn.Module, str]]:
        path, tensor = find_codebook(root, self.codebook_name, None, repr(self), root_path)
        if not isinstance(tensor, nn.Parameter):
            raise TypeError(
                f"{self!r}: SimVQ needs a learned codebook; '{root_path}.{path}' is a buffer (an "
                "EMA codebook, which no gradient reaches): use ResetDeadCodes, or build the "
                "quantiser with a learnable codebook"
            )
        owner, _, pname = path.rpartition(".")
        full = ".".join(p for p in (root_path, owner) if p)
        return [(full, root.get_submodule(owner) if owner else root, pname)]

    def default_rule(self, setup) -> str:
        names = [
            p.name
            for p in setup.probes.values()
            if p.is_a("CodebookUsage") and self.module in (p.module, *p.paths)
        ]
        if len(names) != 1:
            raise ValueError(
                f"{self!r}: pass rule=; the monitor has CodebookUsage probes {names} on "
                f"'{self.module}'"
            )
        return f"{names[0]}/usage_below"

    def apply(self, module: nn.Module, name: str) -> list[nn.Parameter]:
        simvq(module, name)
        return list(getattr(module.parametrizations, name)[0].parameters())
