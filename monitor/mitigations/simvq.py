"""SimVQ (Zhu et al. 2024, "Addressing Representation Collapse in Vector Quantized Models with One
Linear Layer"; vector-quantize-pytorch's ``SimVQ``): the codebook as a frozen basis times one
learned linear layer, so every code moves with every gradient step."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from .codebooks import find_codebook
from .reparametrize import Reparametrization, register

log = logging.getLogger(__name__)


class SimVQParametrization(nn.Module):
    """``E -> C W + b``, a ``torch.nn.utils.parametrize`` parametrization of a codebook
    ``E (K, D)`` or ``(H, K, D)``.

    ``basis="codebook"``: ``C`` (buffer ``frozen``) is the codebook at the switch, frozen;
    ``W (D, D)`` (``weight``) starts at the identity and ``b (D,)`` (``bias``) at zero, so the
    codebook, and with it the model's function, is unchanged when applied (exactly: ``C I + 0 = C``
    in float32/float64 arithmetic; a TF32 or autocast matmul rounds the codebook at the switch).
    ``basis="paper"``: the authors' start (youngsheen/SimVQ, ``taming/modules/vqvae/quantize.py``):
    ``C ~ N(0, 1/D)`` frozen and ``W, b`` as a fresh ``nn.Linear(D, D)`` draws them
    (``U(-1/sqrt(D), 1/sqrt(D))``), from ``generator``: a new codebook, for the start of training.
    Every code is ``c_k W + b``: one gradient step on ``W`` moves the whole codebook, including
    codes no input chose (SimVQ's remedy for codebook collapse). The original parameter stays in
    the graph times zero (value and gradient exactly 0), so a ``DistributedDataParallel`` wrapper
    built before the switch still finds it used; it no longer affects the model.

    Args:
        codebook: the codebook being reparametrised.
        basis: ``"codebook"`` or ``"paper"``.
        generator: the draws of ``basis="paper"`` (seeded: every rank draws the same).
    """

    def __init__(self, codebook: torch.Tensor, basis: str = "codebook", generator=None) -> None:
        super().__init__()
        D = codebook.shape[-1]
        like = {"dtype": codebook.dtype, "device": codebook.device}
        if basis == "paper":
            frozen = torch.randn(codebook.shape, generator=generator) * D**-0.5
            weight, bias = torch.empty(D, D), torch.empty(D)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
            nn.init.uniform_(bias, -(D**-0.5), D**-0.5, generator=generator)
            # C W' + b as the authors' nn.Linear computes it, in this class's C W + b
            frozen, weight, bias = (
                frozen.to(**like),
                weight.T.contiguous().to(**like),
                bias.to(**like),
            )
        elif basis == "codebook":
            frozen, weight = codebook.detach().clone(), torch.eye(D, **like)
            bias = torch.zeros(D, **like)
        else:
            raise ValueError(f"basis must be 'codebook' or 'paper', got {basis!r}")
        self.register_buffer("frozen", frozen)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return self.frozen @ self.weight + self.bias + original.mul(0)


def simvq(
    module: nn.Module, name: str = "weight", basis: str = "codebook", seed: int = 0
) -> nn.Module:
    """Reparametrise the learned codebook ``module.<name>`` as SimVQ's ``C W + b``; returns
    ``module``.

    Args:
        module: the module holding the codebook (an ``nn.Embedding``: ``name="weight"``;
            vector-quantize-pytorch's codebook with ``learnable_codebook=True``:
            ``module._codebook``, ``name="embed"``).
        name: the parameter, shaped ``(K, D)`` or ``(H, K, D)``.
        basis: ``"codebook"`` (the function is unchanged) or ``"paper"`` (the authors' random
            start: a new codebook), see :class:`SimVQParametrization`.
        seed: seed of the ``"paper"`` draws.

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
    g = torch.Generator().manual_seed(seed)
    return register(module, name, SimVQParametrization(weight, basis, g))


class SimVQ(Reparametrization):
    """Reparametrise a quantiser's learned codebook as SimVQ's ``C W + b``, at start or when the
    codebook rule fires; from then on the whole codebook moves with ``W`` and ``b``, so codes no
    input chooses follow the encoder instead of dying.

    At the start (``when="start"``) the codebook starts as the authors' does (``basis="paper"``:
    ``C ~ N(0, 1/D)`` frozen, ``W`` and ``b`` drawn as ``nn.Linear(D, D)`` draws them): the
    start their usage comes from (final held-out usage within 0.03 of their code on the same
    autoencoder, benchmarks/RESULTS.md). When a rule fires (``when="rule"``, training under way)
    ``C`` is the codebook as it is, ``W = I`` and ``b = 0`` (``basis="codebook"``): the model
    computes the same function (exactly, in float32/float64 without TF32). The new parameters
    join the optimizer in a param group of their own with the codebook's hyper-parameters.

    Args:
        module: path of the quantiser (e.g. ``"quantizer"``).
        codebook: the codebook relative to ``module`` (see
            :class:`~collapse_monitor.mitigations.ResetDeadCodes`); default: its only
            ``nn.Embedding``, else a parameter named ``embed``/``codebook``/``embedding``.
        when: ``"start"`` (at attach, before DDP wrapping and before Lightning builds the
            optimizers) or ``"rule"`` (at the first log where ``rule`` fired).
        rule: default the ``usage_below`` rule of the ``CodebookUsage`` probe on ``module``.
        optimizer: where the new parameters go (also taken from ``monitor.step``).
        basis: ``"paper"`` (default at the start) or ``"codebook"`` (default, and the only
            choice, under ``when="rule"``: function-preserving).
        seed: seed of the ``"paper"`` draws (the same on every rank).
        name: see :class:`~collapse_monitor.mitigations.Mitigation` (default ``"simvq"``).

    Raises:
        TypeError: the codebook is not a learned parameter (EMA codebooks: use
            :class:`~collapse_monitor.mitigations.ResetDeadCodes`).
        ValueError: ``basis="paper"`` with ``when="rule"`` (it would replace a trained
            codebook mid-run).

    Guarantees as :class:`~collapse_monitor.mitigations.SigmaReparam`: every rank applies it at
    the same log with identical values; applied after a DDP wrapper was
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
        basis: str | None = None,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        self.codebook_name = codebook
        self.basis = basis or ("paper" if when == "start" else "codebook")
        if self.basis not in ("paper", "codebook") or (self.basis == "paper" and when != "start"):
            raise ValueError(
                f"SimVQ basis must be 'codebook', or 'paper' with when='start'; got {basis!r} "
                f"with when={when!r}"
            )
        self.seed = seed
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
        if self.basis == "paper":  # a new codebook: say so (basis="codebook" keeps it)
            log.info("%r: the codebook starts from SimVQ's random basis (basis='paper')", self)
        simvq(module, name, self.basis, self.seed)
        return list(getattr(module.parametrizations, name)[0].parameters())
