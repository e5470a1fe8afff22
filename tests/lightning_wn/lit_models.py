"""Small LightningModules and data for the callback tests."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_wn import FoldWeightNormOnLoad, apply_weight_norm


class ConvClassifier(FoldWeightNormOnLoad, LightningModule):
    def __init__(self, channels: int = 8, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(4 * channels, 5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class LazyHead(ConvClassifier):
    """Builds its head in ``configure_model``, as large models do."""

    def __init__(self, channels: int = 8, lr: float = 1e-2) -> None:
        super().__init__(channels, lr)
        self.head = None

    def configure_model(self) -> None:
        if self.head is None:
            self.head = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))


class LazyNormalizedHead(LazyHead):
    """Builds its head in ``configure_model`` and normalizes it there, as the callback asks of such layers."""

    def configure_model(self) -> None:
        if self.head is None:
            self.head = nn.Linear(5, 5)
            apply_weight_norm(self, include=["head"])


class DictBatches(ConvClassifier):
    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch["image"]), batch["label"])


class RandomImages(LightningDataModule):
    """Fixed random images: the callback's mechanics, not learning, are under test here."""

    def __init__(self, size: int = 256, batch_size: int = 32, as_dict: bool = False) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(size, 3, 8, 8, generator=generator) * 2 + 0.5
        self.y = torch.randint(0, 5, (size,), generator=generator)
        self.batch_size, self.as_dict = batch_size, as_dict

    def train_dataloader(self) -> DataLoader:
        if self.as_dict:
            data = [{"image": x, "label": y} for x, y in zip(self.x, self.y)]
            return DataLoader(data, batch_size=self.batch_size)
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)


def trainer(**kwargs) -> Trainer:
    """A quiet one-process CPU Trainer for the tests; ``kwargs`` override its defaults."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    return Trainer(**{**defaults, **kwargs})
