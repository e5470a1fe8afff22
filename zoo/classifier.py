"""The paper's CIFAR-10 classifier as a LightningModule, with its optimization schedule.

Adam with beta2 0.999; the learning rate is constant for the first half of training, then decays
linearly to 0 while beta1 drops from 0.9 to 0.5 (Salimans & Kingma, 2016, Section 5.1). Weight
norm is not part of the model: the ``WeightNormalization`` callback adds it from the config.

Example:
    >>> model = PaperClassifier(in_channels=1, width=8)
    >>> model(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from zoo.nets import CifarNet, Norm


class PaperClassifier(LightningModule):
    """The paper's CIFAR-10 CNN; ``norm`` picks batch norm or mean-only batch norm per conv.

    Args:
        in_channels: 3 for CIFAR-10, 1 for (Fashion-)MNIST.
        num_classes: output classes.
        width: channels of the first block (96 in the paper); later blocks have twice as many.
        norm: ``none``, ``batch_norm`` or ``mean_only_bn`` after every conv.
        noise_std: Gaussian input noise in training (0.15 in the paper).
        dropout: dropout after each pooling (0.5 in the paper).
        lr: Adam's learning rate for the first half of training (the authors' code's default; 0.003
            made the narrow networks here spike).
        norm_output: put ``norm`` after the final dense layer too, as the authors' code does.
        init_std: draw conv and dense weights from N(0, ``init_std``); None keeps PyTorch's init.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 96,
        norm: Norm = "none",
        noise_std: float = 0.15,
        dropout: float = 0.5,
        lr: float = 0.001,
        norm_output: bool = False,
        init_std: float | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = CifarNet(
            in_channels=in_channels, num_classes=num_classes, width=width, norm=norm, noise_std=noise_std,
            dropout=dropout, norm_output=norm_output, init_std=init_std,
        )  # fmt: skip
        self.train_loss = MeanMetric()  # the epoch's mean over every process's batches, reduced once per epoch
        self.train_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.train_accuracy(logits, y)
        self.train_loss.update(loss.detach(), len(y))
        self.log("train/loss_step", loss, prog_bar=True)
        self.log("train/loss_epoch", self.train_loss, on_step=False, on_epoch=True)
        self.log("train/accuracy", self.train_accuracy, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_accuracy, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_accuracy, "test")

    def _evaluate(self, batch: tuple[Tensor, Tensor], accuracy: MulticlassAccuracy, stage: str) -> None:
        x, y = batch
        logits = self(x)
        accuracy(logits, y)
        self.log(f"{stage}/loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.log(f"{stage}/accuracy", accuracy)  # torchmetrics aggregates over the epoch and all ranks

    def on_validation_epoch_end(self) -> None:
        self.log("val/error", 1 - self.val_accuracy.compute(), prog_bar=True, sync_dist=True)  # equal on every rank

    def on_test_epoch_end(self) -> None:
        self.log("test/error", 1 - self.test_accuracy.compute(), sync_dist=True)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self(batch[0]).argmax(1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, betas=(0.9, 0.999))

    def on_train_epoch_start(self) -> None:
        lr, beta1 = schedule(self.current_epoch, self.trainer.max_epochs, self.hparams.lr)
        for group in self.trainer.optimizers[0].param_groups:
            group["lr"], group["betas"] = lr, (beta1, group["betas"][1])
        self.log("charts/lr", lr, sync_dist=True)


def schedule(epoch: int, max_epochs: int, lr: float) -> tuple[float, float]:
    """The paper's learning rate and Adam beta1 for ``epoch`` of ``max_epochs``.

    Example:
        >>> [schedule(e, 4, 1.0) for e in range(4)]
        [(1.0, 0.9), (1.0, 0.9), (1.0, 0.5), (0.5, 0.5)]
    """
    if max_epochs is None or max_epochs < 2:
        return lr, 0.9
    half = max_epochs // 2
    if epoch < half:
        return lr, 0.9
    return lr * (max_epochs - epoch) / (max_epochs - half), 0.5
