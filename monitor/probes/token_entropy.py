"""Predictive entropy of a language model's next-token distribution (docs/metrics.md#tokenentropy):
the policy entropy whose collapse stalls RL post-training."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .._adapters import is_linear, linear_parts
from ..contracts import Readout
from ..functional.token_entropy import chunked_entropy, entropy_from_sums
from ..reading import (
    Reading,
    first_tensor,
    floating,
    keeps_last,
    label_shift,
    model_side,
    token_mask,
)
from ..rules import RuleSpec
from ..stats import TokenEntropySums, Window, to_device
from .base import Probe

_F64 = torch.float64
# configuration fields of transformers models whose logits are not the head's plain output: the
# hidden-state path would compute other logits than the model's (refused, never guessed)
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
    "dim_model_base",  # MiniCPM scales the hidden states before the head
    "mup_width_multiplier",  # Phi-3-small
)


def _states_or_logits(value):
    """A model output's ``logits``, else its ``last_hidden_state`` (a backbone: for ``head=``);
    else its first tensor."""
    if isinstance(value, Mapping):
        for key in ("logits", "last_hidden_state"):
            if isinstance(value.get(key), torch.Tensor):
                return value[key]
    return first_tensor(value)


def _eos_ids(model: nn.Module) -> set[int]:
    """The end-of-sequence ids a ``transformers`` model names in its generation configuration
    and its configuration."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, "eos_token_id", None)
        ids.update([value] if isinstance(value, int) else value or ())
    return ids


def _output_kind(output) -> str | None:
    """A model output's ``"logits"`` or ``"hidden"`` (a backbone's); None for a plain tensor."""
    if not isinstance(output, Mapping):
        return None
    return "logits" if isinstance(output.get("logits"), torch.Tensor) else "hidden"


class TokenEntropy(Probe):
    """Per-token entropy of a language model's predictive distribution, over the tokens that count.

    ``H = logsumexp(z) - sum_j softmax(z)_j z_j`` (nats) of each position's logits ``z`` (``V``
    entries), computed in at least float32 from any logits dtype, ``chunk`` vocabulary entries at a
    time (memory ``rows * chunk``, never ``rows * V``). The same quantity as TRL's
    ``entropy_from_logits`` and torchtitan's trainer entropy; its fall towards 0 is policy-entropy
    collapse (Cui et al. 2025).

    The tokens that count: positions whose next-token label is not ``ignore_index``
    (``observe(targets=labels)``, aligned with the model's label shift as :class:`LogitHealth`
    does; labels longer than the logits of a call with ``logits_to_keep`` are right-aligned to
    them, other lengths are an error), that are
    not padding (the model's ``attention_mask``: the position and the token it predicts are both
    real), and, with ``observe(mask=)``, whose predicted token is marked (a completion mask,
    aligned as the labels are). Without any of these, every position counts.

    Cheap by default: ``tokens`` rows that count are drawn per forward call, uniformly without
    replacement, and each stands for ``n / k`` tokens (``k`` drawn of ``n``): the window's sums are
    unbiased estimates of the sums over every token, and ``entropy_mean_ci95`` is the 95%
    half-width of the mean from the calls' sampling variances ``n^2 (1 - k/n) s^2 / k`` (Student's
    t quantile, with the sampled rows less one per call as degrees of freedom).
    ``tokens=None`` computes every row (exact).

    Without materialised logits (TRL's fused LM head, fused linear-cross-entropy kernels):
    ``TokenEntropy("model", head="lm_head")`` reads the hidden states the head would read (the
    backbone's ``last_hidden_state``) and makes the drawn rows' logits from the head's weight and
    bias (tied embeddings included), ``chunk`` vocabulary rows at a time. A model whose logits are
    scaled or soft-capped after the head (``final_logit_softcapping``, ``logit_scale``, ...) is
    refused on that path.

    Args:
        module: the module whose output are the logits ``(B, T, V)`` or ``(N, V)`` (the LM head;
            the first tensor of a tuple output, a model output's ``logits``; ``extract=``
            otherwise), or with ``head``, the hidden states ``(B, T, D)`` the head reads (a
            backbone's ``last_hidden_state``).
        head: the path of the ``nn.Linear`` LM head whose weight makes the logits from
            ``module``'s hidden states (the hidden-state path); None: ``module`` gives logits.
        temperature: the logits are divided by it (a sampler's temperature: GRPO's policy
            entropy is that of ``z / T``).
        rollout: watch generation instead of training: the probe records only
            ``monitor.observe(rollout=True)`` blocks (``generate()``; with
            ``CollapseTrainerCallback``, TRL's rollouts) and nothing else, and at each of their
            forwards only the last position of each sequence (the distribution the next token
            is drawn from), leaving out padded positions and each sequence from the step it is
            fed one of ``end_ids`` on, to the end of that ``generate()`` call (known by its
            key-value cache starting empty, or without one a sequence that did not grow by one
            position; the prompt's own last token never ends it). Labels and advantages are
            not read.
        end_ids: every token id the sampler stops on (default: the model's
            ``generation_config`` and ``config`` ``eos_token_id``, and with
            ``CollapseTrainerCallback`` the tokenizer's; pass them when ``generate()`` gets its
            own; ``()``: every row of every step samples). A rollout forward without any raises
            ``ValueError``.
        tokens: rows drawn per call (default 64), or ``None`` for every row.
        certain: entropy (nats) below which a token counts as near-certain (default 0.01).
        high: entropy (nats) above which a token counts as high-entropy (default 0.672, the 80th
            percentile of token entropy in the chains of thought measured by Wang et al. 2025,
            "Beyond the 80/20 Rule").
        ignore_index: the label that marks a position that does not count.
        target_shift: as :class:`LogitHealth`'s (default: the model's, 1 inside a
            ``transformers`` causal LM).
        chunk: vocabulary entries computed at a time.
        seed: of the row sampling.

    Reports ``entropy_mean`` (nats) with ``entropy_mean_ci95`` (0 when exact),
    ``entropy_std`` (the spread of token entropy over the window's tokens), ``entropy_upper95``
    (nats: a one-sided 95% upper bound on the policy's mean entropy, the window's tokens taken
    as independent draws of the policy's: ``mean + t_0.95 sqrt(std^2 / tokens + sampling
    variance / tokens^2)``), ``entropy_q10``/``q50``/``q90`` (from a histogram of 0.01-nat
    bins: exact to one bin), ``certain_fraction``, ``high_fraction``, ``tokens`` (counted; an
    estimate when sampled), ``sampled`` (rows computed), ``skipped`` (sampled rows with NaN
    or Inf logits, left out) and ``out_of_range`` (labels other than ``ignore_index`` that name
    no token: their positions left out);
    with labels, ``logprob_mean`` (the mean log-probability of the tokens that follow); with
    ``observe(advantages=)`` too (one per sequence ``(B,)`` or per token ``(B, T)``),
    ``logprob_advantage_cov``: the covariance over the tokens of that log-probability with the
    token's advantage, whose sign and size drive the entropy's change under policy-gradient
    training (Cui et al. 2025: positive covariance lowers the entropy)
    (:func:`~collapse_monitor.functional.token_entropy_metrics`).

    Default rule ``policy_entropy_collapse``: ``entropy_upper95`` below 0.2 nats (the policy's
    mean entropy is below 0.2 at 95% confidence) and below a fifth of its highest window so far
    (one log); a window whose bound is NaN (fewer than 2 rows computed) is skipped. A healthy
    fine-tuning run lowers the entropy too; the rule waits for a near-deterministic policy on
    both the run's own scale and an absolute one.
    It is meant for sampled text (RL post-training): a model trained on a task whose every
    next token is determined is near-deterministic by design (pass ``default_rules=False``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from collapse_monitor import CollapseMonitor, probes
        >>> model = nn.Sequential(nn.Identity())  # stands for the LM head
        >>> mon = CollapseMonitor(model, [probes.TokenEntropy("0", tokens=None, name="ent")], 1)
        >>> with mon.observe(targets=torch.tensor([[3, 1, -100]])):  # 3 positions, 1 ignored
        ...     _ = model(torch.zeros(1, 3, 4))  # uniform over 4 tokens: log 4 nats
        >>> m = mon.step()
        >>> round(m["collapse/ent/entropy_mean"], 6), m["collapse/ent/tokens"]
        (1.386294, 2.0)
        >>> mon.close()
    """

    headline = ("entropy_mean",)
    bad_input = ("out_of_range",)
    # entropy collapse (Cui et al. 2025): the policy near-deterministic, judged on the run's own
    # scale and an absolute one. Below 0.2 nats (the target entropy of Skywork-OR1's adaptive
    # entropy control, TRL's entropy_target) and below a fifth of the highest window so far:
    # a pretrained policy that starts near 0.3 nats and stays there, and a model trained from
    # scratch that settles at 0.4 nats after log V, are both left alone. Judged on the upper
    # 95% bound of the policy's mean, not on the window's mean: a window of a few dozen tokens
    # dips under 0.2 by chance when a few of them are uncertain (a KL-anchored twin at 0.23
    # nats read 0.196 once), while a collapsed policy is certain on every token and its bound
    # sits on its mean. Set on the post-training zoo of benchmarks/detection.py; one log
    # suffices (the bound carries the window's own uncertainty)
    rules = (
        RuleSpec(
            "entropy_upper95",
            0.8,
            "drop",
            name="policy_entropy_collapse",
            patience=1,
            bound=0.2,
            message="the policy is near-deterministic (policy-entropy collapse): exploration and "
            "the reward's growth stop. Standard fixes: an entropy bonus or adaptive entropy "
            "control (TRL: entropy_coef, use_adaptive_entropy), a KL anchor (beta), a higher "
            "clip bound (epsilon_high, DAPO's clip-higher) or a lower learning rate",
        ),
    )

    reads = Reading(
        "floating-point logits (..., V), or hidden states (B, T, D) with head=",
        floating(1),
        find=_states_or_logits,
        hint="logits",
    )
    keywords = {"targets": False, "mask": False, "advantages": False}
    uses_token_mask = True
    skips_generation = True
    described = ("label_shift",)

    def __init__(
        self,
        module: str,
        tokens: int | None = 64,
        certain: float = 0.01,
        high: float = 0.672,
        ignore_index: int = -100,
        target_shift: int | None = None,
        chunk: int = 16384,
        seed: int = 0,
        head: str | None = None,
        temperature: float = 1.0,
        rollout: bool = False,
        end_ids: Sequence[int] | None = None,
        name: str | None = None,
        extract=None,
        pool: bool = False,
    ) -> None:
        super().__init__(module, name, extract, pool=pool)
        if tokens is not None and int(tokens) < 1:
            raise ValueError(f"tokens must be >= 1 or None, got {tokens}")
        if (target_shift or 0) < 0 or int(chunk) < 1:
            raise ValueError(f"target_shift >= 0 and chunk >= 1, got {target_shift}, {chunk}")
        self.tokens = None if tokens is None else int(tokens)
        self.certain, self.high = float(certain), float(high)
        self.ignore_index = ignore_index
        self.target_shift = target_shift
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.chunk = int(chunk)
        self.seed = seed
        self.head = head
        self.temperature = float(temperature)
        self.rollout = bool(rollout)
        self.end_ids = None if end_ids is None else tuple(int(i) for i in end_ids)
        self._end = torch.zeros(0, dtype=torch.int64)  # the ids that end a sequence (attach)
        self._ended: torch.Tensor | None = None  # (B,) the sequences of this generate() ended
        self._length: int | None = None  # positions of the last forward without a cache
        self._head: nn.Linear | None = None  # found at attach
        self.label_shift = 0  # resolved at attach
        self._generator: torch.Generator | None = None  # made at attach (does not pickle)
        self._gather_head = False
        self._whole_head = None  # its gathered (W, b, low-rank) for this call (tp_gather)

    def on_attach(self, setup, found) -> None:
        self.label_shift = label_shift(
            setup.model, [p for p, _ in found], self.target_shift, repr(self)
        )
        # each rank draws its own rows (one seed on every rank would draw the same positions);
        # the ranks of a tensor-parallel group, which see one batch, draw the same
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if setup.tensor_parallel is not None:
            rank = setup.tensor_parallel.ranks[0]
        self._rank = rank
        self._generator = torch.Generator().manual_seed(self.seed + 1_000_003 * rank)
        if self.head is not None:
            self._head = self._find_head(setup.model)
            # a tensor-parallel head: its weight gathered in the forward, which every rank of
            # the group runs (under FSDP2 alone a head sharded there is refused below)
            layout = setup.tensor_parallel
            self._gather_head = layout is not None and layout.sharded_dim(self.head) is not None
        if self.rollout:
            ends = self.end_ids
            self.also_ends(_eos_ids(setup.model) if ends is None else ends)

    def also_ends(self, ids) -> None:
        """Count ``ids`` among the tokens that end a sequence (``rollout=True``): a sampler's
        own (the trainer's tokenizer's), beside the model's."""
        self._end = torch.tensor(sorted({*self._end.tolist(), *map(int, ids)}), dtype=torch.int64)

    def _find_head(self, model: nn.Module) -> nn.Linear:
        try:
            head = model.get_submodule(self.head)
        except AttributeError:
            raise ValueError(f"{self!r}: no module '{self.head}' (head=) in the model") from None
        if not is_linear(head):
            raise ValueError(
                f"{self!r}: head='{self.head}' is a {type(head).__name__}; the hidden-state path "
                "needs the nn.Linear (or PEFT LoRA Linear) that makes the logits"
            )
        linear_parts(head, f"{self!r}: head '{self.head}'")  # (an adapter it cannot read)
        for mod in model.modules():
            config = getattr(mod, "config", None)
            text = config.get_text_config() if hasattr(config, "get_text_config") else config
            scaled = {
                f: getattr(text, f)
                for f in _LOGIT_TRANSFORMS
                if getattr(text, f, None) not in (None, 1, 1.0)
            }
            if scaled:
                raise ValueError(
                    f"{self!r}: the model transforms its logits after the head ({scaled}); "
                    "the hidden-state path would compute other logits: probe the logits"
                )
        return head

    def new_window(self) -> Window:
        return Window({"sums": TokenEntropySums()})

    # ----------------------------------------------------------------- hot path
    def _counts(self, z: torch.Tensor, call):
        """Over the rows of the (shifted) logits: ``(N,)`` bool, the positions that count; the
        token each predicts ``(N,)`` (None without labels); its advantage ``(N,)`` float64 (None
        without ``observe(advantages=)``)."""
        s = self.label_shift
        seq = z.ndim == 3
        if s and not seq:
            raise call.error(f"a label shift needs (B, T, V) logits, got {tuple(z.shape)}")
        lead = z.shape[:-1]
        shifted = (lead[0], lead[1] - s) if seq else lead
        counts = torch.ones(shifted, dtype=torch.bool, device=z.device)
        labels = call.keyword("targets")
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.is_floating_point() or labels.dtype == torch.bool:
                raise call.error(f"targets must be integer token ids, got dtype {labels.dtype}")
            if seq and labels.ndim == 2 and labels.shape[1] > lead[1] and keeps_last(call, lead[1]):
                labels = labels[:, labels.shape[1] - lead[1] :]  # logits of the last positions
            labels = labels[..., s:] if s else labels
            if tuple(labels.shape) != tuple(shifted):
                raise call.error(
                    f"targets of shape {tuple(labels.shape)} do not match logits of shape "
                    f"{tuple(z.shape)} (shift {s}: expected {tuple(shifted)})"
                )
            labels = to_device(labels, z.device)
            counts &= labels != self.ignore_index
        adv = self._advantages(call, lead, shifted, s, z.device)
        if seq:
            real = token_mask(call, lead[0], lead[1], z.device)
            if real is not None:
                if call.keyword("mask") is not None:  # marks the predicted tokens
                    counts &= real[:, s:]
                else:  # padding: the position and the token it predicts are both real
                    counts &= real[:, : lead[1] - s] & real[:, s:]
        flat = None if labels is None else labels.reshape(-1).to(torch.int64)
        return counts.reshape(-1), flat, None if adv is None else adv.reshape(-1)

    def _advantages(self, call, lead, shifted, s: int, device):
        """``observe(advantages=)`` per sequence ``(B,)`` or per token ``(B, T)`` (aligned as the
        labels are), as ``shifted``-shaped float64."""
        adv = call.keyword("advantages")
        if adv is None:
            return None
        adv = to_device(torch.as_tensor(adv), device).to(_F64)
        if len(lead) == 2 and adv.ndim == 1 and adv.shape[0] == lead[0]:
            return adv[:, None].expand(shifted)
        if (
            len(lead) == 2
            and adv.ndim == 2
            and adv.shape[1] > lead[1]
            and keeps_last(call, lead[1])
        ):
            adv = adv[:, adv.shape[1] - lead[1] :]
        adv = adv[..., s:] if s else adv
        if tuple(adv.shape) != tuple(shifted):
            raise call.error(
                f"advantages of shape {tuple(adv.shape)}: expected one per sequence "
                f"({lead[0]},) or per token {tuple(shifted)} (after the shift {s})"
            )
        return adv

    def _sampled_rows(self, z: torch.Tensor, call):
        """A generation step: the last position of each sequence, the distribution the next
        token is drawn from ``(B, V)`` (or its hidden state), and ``(B,)`` bool, the rows that
        still generate: the position is real and the sequence has not been fed an end token in
        this ``generate()`` call (afterwards it is fed padding, or anything).

        A call starts where the key-value cache is empty (without a cache, ``use_cache=False``,
        where the sequence did not grow by one position), or where the batch changes."""
        if z.ndim != 3:
            raise call.error(f"rollout=True needs (B, T, V) logits or states, got {tuple(z.shape)}")
        B, T = z.shape[:2]
        counts = torch.ones(B, dtype=torch.bool, device=z.device)
        real = token_mask(call, B, T, z.device)
        if real is not None:
            counts &= real[:, -1]
        if not self._end.numel() and self.end_ids is None:
            raise call.error(
                "rollout=True needs the ids that end a sequence, and neither the model's "
                "generation_config nor its config names an eos_token_id: pass end_ids=[...] "
                "(every id the sampler stops on; end_ids=() when every row of every step samples)"
            )
        last = call.model_inputs.get("last_ids")
        self._end = to_device(self._end, z.device)
        past = call.model_inputs.get("past_length")
        # a new generate() call: the cache is empty, or without one the sequence did not grow
        # by one position
        length = model_side(call)[1] or T  # the model's input, not the kept logits
        start = past == 0 if past is not None else self._length != length - 1
        self._length = length if past is None else None
        ended = self._ended
        if start or ended is None or ended.shape[0] != B:
            ended = torch.zeros_like(counts)  # (the prompt's last token is never an end)
        elif last is not None and last.shape == (B,):  # fed an end token: ended for the call
            ended = to_device(ended, z.device) | torch.isin(to_device(last, z.device), self._end)
        self._ended = ended
        return z[:, -1].detach(), counts & ~ended

    def tp_gather(self, call) -> None:
        """A vocabulary-parallel head's whole weight, for :meth:`update` (a 1-D tensor-parallel
        DTensor: the group runs this forward together; FSDP2's shard of a unit of its own is
        refused in update)."""
        w = None if self._head is None else self._head.weight
        if self._gather_head and getattr(getattr(w, "device_mesh", None), "ndim", 0) == 1:
            self._whole_head = linear_parts(self._head, f"head '{self.head}'", gather=True)

    def update(self, window, z, call) -> None:
        kind = None if self.extract is not None else _output_kind(call.output)
        if kind == "hidden" and self._head is None:
            raise call.error("a model output without logits: pass head= (the LM head's path)")
        if kind == "logits" and self._head is not None:
            raise call.error("logits with head=: probe them without head=, or the backbone with it")
        s = self.label_shift
        if self.rollout:
            rows, counts = self._sampled_rows(z, call)
            targets = adv = None
        else:
            counts, targets, adv = self._counts(z, call)
            rows = (z[:, : z.shape[1] - s] if s else z).detach().reshape(-1, z.shape[-1])
        weight = bias = None
        low_rank = []
        if self._head is not None:  # (a LoRA head: its base weight and low-rank terms)
            whole, self._whole_head = self._whole_head, None
            weight, bias, low_rank = whole or linear_parts(self._head, f"head '{self.head}'")
            parts = [weight, *(t for pair in low_rank for t in pair)]
            if any(type(t) is not torch.Tensor for t in parts) or not weight.numel():
                raise call.error(
                    f"head '{self.head}' holds a {type(weight).__name__} weight of shape "
                    f"{tuple(weight.shape)} (sharded or partitioned): the hidden-state path needs "
                    "the whole (V, D) weight"
                )
            if weight.shape[1] != rows.shape[1]:
                raise call.error(
                    f"hidden states of width {rows.shape[1]} for head '{self.head}' of input "
                    f"width {weight.shape[1]}"
                )
        if targets is not None:  # a label that names no token: left out, counted
            V = z.shape[-1] if weight is None else weight.shape[0]
            outside = counts & ((targets < 0) | (targets >= V))
            window["sums"].out_of_range += outside.sum()
            counts = counts & ~outside
        N = rows.shape[0]
        if not N:
            return
        n = counts.sum().to(_F64)
        if self.tokens is None or self.tokens >= N:
            idx = None
            drawn, use, k = rows, counts, n
        else:  # a uniform draw of k rows among those that count, without a host sync
            keys = to_device(torch.rand(N, generator=self._generator), z.device)
            idx = torch.where(counts, keys, 2.0).topk(self.tokens, largest=False).indices
            drawn, use = rows[idx], counts[idx]
            k = use.sum().to(_F64)  # min(tokens, n): the drawn rows that count
        if targets is not None:
            picked = targets if idx is None else targets[idx]
            h, lp = chunked_entropy(
                drawn, self.chunk, weight, bias, self.temperature, picked.clamp_min(0), low_rank
            )
            h, lp = h.to(_F64), lp.to(_F64)
        else:
            h = chunked_entropy(
                drawn, self.chunk, weight, bias, self.temperature, low_rank=low_rank
            ).to(_F64)
            lp = None
        finite = torch.isfinite(h)
        if lp is not None:  # (-inf logits give a token no log-probability)
            finite &= torch.isfinite(lp)
        skipped = (use & ~finite).sum()
        call.nonfinite_rows(use & ~finite, use)
        use = use & finite
        h = torch.where(use, h, 0.0)
        w = torch.where(use, n / k.clamp_min(1.0), 0.0)  # the tokens each computed row stands for
        # simple random sampling of k of n: Var(n * mean) = n^2 (1 - k/n) s^2 / k
        kk = use.sum().to(_F64)
        mean = h.sum() / kk.clamp_min(1.0)
        s2 = torch.where(use, (h - mean) ** 2, 0.0).sum() / (kk - 1).clamp_min(1.0)
        variance = n * n * (1 - k / n.clamp_min(1.0)) * s2 / k.clamp_min(1.0)
        dof = torch.where(k < n, (kk - 1).clamp_min(0.0), 0.0)  # exact: no sampling variance
        unknown = (k < n) & (kk < 2)  # sampled, but one row cannot show a variance
        sums = window["sums"]
        sums.add(h, w, variance, dof, self.certain, self.high, skipped, unknown)
        if lp is not None:
            a = None if adv is None else (adv if idx is None else adv[idx])
            a = None if a is None else torch.where(use, a, 0.0)  # (NaN at padding: left out)
            sums.add_logprob(torch.where(use, lp, 0.0), w, a)

    # ----------------------------------------------------------------- persistence
    def extra_state(self) -> dict:
        return {"generator": self._generator.get_state()}

    def load_extra_state(self, state: dict) -> None:
        # only this rank's own draws continue; another rank's (rank 0's state loaded by all)
        # would draw the same rows on every rank: the others keep their own stream
        if state.get("generator_mine", self._rank == 0):
            self._generator.set_state(state["generator"])

    # ----------------------------------------------------------------- readout
    def readout(self, window) -> Readout:
        st = window["sums"]
        out = entropy_from_sums(
            st.tokens.item(),
            st.total.item(),
            st.variance.item(),
            st.hist.cpu(),
            st.certain.item(),
            st.high.item(),
            st.sampled.item(),
            st.skipped.item(),
            st.dof.item() or math.inf,
            unknown=bool(st.unknown.item()),
            logprob=(st.lp_weight.item(), st.lp_sum.item()),
            advantage=(st.adv_weight.item(), st.adv_lp.item(), st.adv_a.item(), st.adv_lpa.item()),
            square=st.square.item(),
        )
        out["out_of_range"] = float(st.out_of_range.item())
        return Readout({self.key(k): v for k, v in out.items()})
