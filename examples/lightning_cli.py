"""LightningCLI recipe: a digits classifier whose collapse monitoring lives in the YAML config.

The model and data here know nothing of the monitor; ``lightning_cli.yaml`` adds
``CollapseCallback`` with its probes, rules and pictures under ``trainer.callbacks``.

    python examples/lightning_cli.py fit --config examples/lightning_cli.yaml
    collapse-monitor report runs/lightning_cli
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class DigitsClassifier(L.LightningModule):
    """MLP 64-128-128-10; ``backbone`` ends in the penultimate features, ``head`` is linear."""

    def __init__(self, width: int = 128, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = nn.Sequential(
            nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()
        )
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/accuracy", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class Digits(L.LightningDataModule):
    """scikit-learn's 8x8 digits (ships with the package): 1,500 train, 297 validation."""

    def __init__(self, batch_size: int = 64) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32) / 16.0
        y = torch.tensor(data.target)
        self.train_set = TensorDataset(x[:1500], y[:1500])
        self.val_set = TensorDataset(x[1500:], y[1500:])

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=gen)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)


def main(args=None) -> LightningCLI:
    return LightningCLI(DigitsClassifier, Digits, args=args, save_config_callback=None)


if __name__ == "__main__":
    main()
