"""The four monitored workloads of the overhead benchmark (issue 7), each a model, a fixed batch,
an optimiser and the probes/mitigations a user would attach. Random data: the timings do not
depend on what the model learns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from collapse_monitor import mitigations, probes


@dataclass
class Workload:
    name: str
    model: nn.Module
    batch: tuple  # (inputs, targets)
    loss: Callable  # loss(model, inputs, targets) -> scalar
    make_probes: Callable[[], list]
    make_mitigations: Callable[[], list] = field(default=lambda: [])
    lr: float = 1e-3


# ----------------------------------------------------------------------------- MLP
def mlp() -> Workload:
    model = nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )
    x, y = torch.randn(256, 784), torch.randint(0, 10, (256,))
    return Workload(
        "MLP 784-512-512-10, batch 256",
        model,
        (x, y),
        lambda m, x, y: F.cross_entropy(m(x), y),
        lambda: [probes.NeuralCollapse("4", 10, name="head")],
    )


# ----------------------------------------------------------------------------- CNN
def cnn() -> Workload:
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 10),
    )  # fmt: skip
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    return Workload(
        "CNN 3 conv + 2 fc on 32x32, batch 128",
        model,
        (x, y),
        lambda m, x, y: F.cross_entropy(m(x), y),
        lambda: [
            probes.NeuralCollapse("12", 10, name="head"),
            probes.RepresentationRank("11", name="embedding"),
        ],
    )


# ----------------------------------------------------------------------------- GPT
class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, W = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(B, T, W))


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """nanoGPT-style decoder: SDPA attention, learned positions, untied head."""

    def __init__(self, vocab=256, width=256, layers=4, heads=4, context=256) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def gpt(vocab: int = 256) -> Workload:
    tokens = torch.randint(0, vocab, (16, 257))
    x, y = tokens[:, :-1], tokens[:, 1:]
    return Workload(
        f"GPT 4 layers, width 256, 4 heads, context 256, batch 16, vocab {vocab}",
        GPT(vocab),
        (x, y),
        lambda m, x, y: F.cross_entropy(m(x).flatten(0, 1), y.flatten()),
        lambda: [
            probes.AttentionEntropy("blocks", name="attention"),
            probes.NeuralCollapse("head", vocab, name="head"),
            probes.LogitHealth("head", name="logits"),
        ],
    )


# ----------------------------------------------------------------------------- VQ-VAE
class Quantizer(nn.Module):
    """Nearest-code quantiser with a learned codebook; returns (quantized, indices, loss)."""

    def __init__(self, codes: int, dim: int) -> None:
        super().__init__()
        self.codebook = nn.Embedding(codes, dim)

    def forward(self, z: torch.Tensor):
        flat = z.reshape(-1, z.shape[-1])
        idx = torch.cdist(flat, self.codebook.weight).argmin(-1).view(z.shape[:-1])
        q = self.codebook(idx)
        loss = (q - z.detach()).pow(2).mean() + 0.25 * (z - q.detach()).pow(2).mean()
        return z + (q - z).detach(), idx, loss


class VQVAE(nn.Module):
    """Conv encoder to an 8x8 grid of 64-d vectors, 512 codes, conv decoder."""

    def __init__(self, codes: int = 512, dim: int = 64) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 64, 4, 2, 1), nn.ReLU(), nn.Conv2d(64, dim, 4, 2, 1)
        )
        self.quantizer = Quantizer(codes, dim)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(dim, 64, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(64, 3, 4, 2, 1)
        )

    def forward(self, x: torch.Tensor):
        z = self.encoder(x).permute(0, 2, 3, 1)
        q, _, vq_loss = self.quantizer(z)
        return self.decoder(q.permute(0, 3, 1, 2)), vq_loss


def vqvae() -> Workload:
    x = torch.rand(64, 3, 32, 32)

    def loss(m, x, _):
        recon, vq_loss = m(x)
        return F.mse_loss(recon, x) + vq_loss

    return Workload(
        "VQ-VAE conv, 8x8x64 latents, 512 codes, batch 64",
        VQVAE(),
        (x, None),
        loss,
        lambda: [probes.CodebookUsage("quantizer", 512, name="vq")],
        lambda: [mitigations.ResetDeadCodes("quantizer", probe="vq", every_step=False)],
    )


WORKLOADS = {"mlp": mlp, "cnn": cnn, "gpt": gpt, "vqvae": vqvae}
