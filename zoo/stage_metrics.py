"""Logging a model's loss terms the same way in training, validation and test."""

from __future__ import annotations

from lightning.pytorch import LightningModule
from torch import Tensor


def log_stage_metrics(module: LightningModule, stage: str, metrics: dict[str, Tensor], prog_bar: str) -> None:
    """Log ``metrics`` as ``<stage>/<name>``: per step and epoch in training, per epoch otherwise.

    Every value is averaged over processes (``sync_dist``): the epoch means, and in training each
    step's value too (one all-reduce per metric and step under DDP, none on one device). The
    metric named ``prog_bar`` also goes to the progress bar.

    Example:
        >>> from unittest import mock
        >>> import torch
        >>> module = mock.Mock()
        >>> log_stage_metrics(module, "val", {"kl": torch.tensor(1.0)}, prog_bar="kl")
        >>> module.log.call_args.kwargs
        {'prog_bar': True, 'on_step': False, 'on_epoch': True, 'sync_dist': True}
    """
    on_step = stage == "train"
    for name, value in metrics.items():
        module.log(f"{stage}/{name}", value, prog_bar=name == prog_bar, on_step=on_step, on_epoch=True, sync_dist=True)
