"""A small model with a place for every probe, and the probes themselves (for reliability tests)."""

import torch
import torch.nn.functional as F
from torch import nn

from collapse_monitor import probes
from tests.mitigations.test_reset_dead_codes import VQ
from tests.probes.test_attention_entropy import SDPAAttention

C, T, D, K = 4, 6, 16, 8


class Posterior(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, 8)

    def forward(self, h):
        mu, logvar = self.lin(h).chunk(2, -1)
        return mu, logvar


class Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(8, D)
        self.attn = SDPAAttention(D, heads=2)
        self.vq = VQ(K, D)
        self.sae = nn.Linear(D, 32)
        self.sae_act = nn.ReLU()
        self.dec = nn.Linear(32, D)
        self.post = Posterior()
        self.head = nn.Linear(D, C)

    def forward(self, x):  # x: (B, T, 8)
        h = self.enc(x)
        h = h + self.attn(h, causal=True)
        q, _, vq_loss = self.vq(h)
        latents = self.sae_act(self.sae(q))
        pooled = h.mean(1) + 0.1 * self.dec(latents).mean(1)
        mu, logvar = self.post(pooled)
        return self.head(pooled), vq_loss + 1e-3 * (mu.pow(2).mean() + logvar.exp().mean())


def every_probe(prefix=""):
    p = prefix
    return [
        probes.NeuralCollapse(p + "head", C, name="nc"),
        probes.GroupCollapse(p + "enc", 3, name="groups"),
        probes.CodebookUsage(p + "vq", K, name="vq", ema_decay=0.5, warmup_steps=1),
        probes.LatentUsage(p + "sae_act", 32, name="sae"),
        probes.AttentionEntropy(p + "attn", queries=None, name="attn"),
        probes.PosteriorCollapse(p + "post", name="vae"),
        probes.RepresentationRank(p + "enc", name="rank"),
        probes.LogitHealth(p + "head", name="logits"),
        probes.TokenUniformity(p + "enc", name="tokens"),
        probes.DormantUnits(p + "sae_act", name="dormant"),
    ]


def batch(step, n=12, seed=0):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    x = torch.randn(n, T, 8, generator=g)
    y = torch.randint(0, C, (n,), generator=g)
    groups = torch.randint(0, 3, (n, T), generator=g)
    return x, y, groups


def loss_of(out, y):
    logits, aux = out
    return F.cross_entropy(logits, y) + aux


def zoo_steps(model, mon, opt, begin, end, nan_at=None):
    """Train steps ``begin..end-1`` on :func:`batch`; ``{global step: metrics}`` of the logs.
    ``nan_at``: the step before which one encoder weight becomes NaN (a diverging run)."""
    logs = {}
    for step in range(begin, end):
        if step == nan_at:
            with torch.no_grad():
                model.enc.weight[0, 0] = float("nan")
        x, y, groups = batch(step)
        with mon.observe(targets=y, groups=groups):
            loss = loss_of(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        metrics = mon.step(optimizer=opt)
        if metrics is not None:
            logs[mon.global_step] = metrics
    return logs


def every_mitigation(prefix="", codebook="reset"):
    """Every mitigation on the zoo; ``codebook``: ``"reset"`` (ResetDeadCodes at logs),
    ``"every_step"`` (ResetDeadCodes at every step) or ``"simvq"``."""
    from collapse_monitor import mitigations

    p = prefix
    fix = {
        "reset": lambda: mitigations.ResetDeadCodes(p + "vq", every_step=False),
        "every_step": lambda: mitigations.ResetDeadCodes(p + "vq", every_step=True),
        "simvq": lambda: mitigations.SimVQ(p + "vq"),
    }[codebook]
    return [
        fix(),
        mitigations.SigmaReparam(p + "attn"),
        mitigations.ReDo(layers={p + "sae_act": (p + "sae", p + "dec")}),
    ]
