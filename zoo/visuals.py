"""Image grids for the generative models: to TensorBoard when it is the logger, and as PNG files."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import LightningModule
from torch import Tensor
from torchvision.utils import make_grid, save_image


def log_image_grid(module: LightningModule, tag: str, images: Tensor, nrow: int = 8) -> Path | None:
    """Log ``images`` (N, C, H, W in [0, 1]) as one grid; returns the PNG path (rank zero only).

    Call it on every rank (it asks the trainer for its log directory, which synchronizes them).

    The PNG goes to ``<log_dir>/images/<tag>_epoch<NNN>_step<NNNNNNN>.png``: one per validation, several an epoch.
    """
    trainer = module.trainer
    log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
    if trainer.sanity_checking or not trainer.is_global_zero:
        return None
    grid = make_grid(images.detach().float().cpu(), nrow=nrow, padding=1, pad_value=1.0)
    experiment = getattr(module.logger, "experiment", None)
    if hasattr(experiment, "add_image"):  # TensorBoard
        experiment.add_image(tag, grid, global_step=trainer.global_step)
    name = f"{tag}_epoch{trainer.current_epoch:03d}_step{trainer.global_step:07d}.png"
    path = Path(log_dir or trainer.default_root_dir) / "images" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return path
