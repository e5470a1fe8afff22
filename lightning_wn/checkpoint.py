"""Lightning checkpoints of weight-normalized models: read with clear errors, loaded into plain models.

Nothing here imports Lightning: a LightningModule class is only handed in.
"""

from __future__ import annotations

import io
import tempfile
import zipfile
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from lightning_wn.init import INITIALIZED
from lightning_wn.state_dict import fold_state_dict
from lightning_wn.weight_norm import SUPPORTED_LAYERS


def read_checkpoint(path: str | PathLike, *, weights_only: bool = True) -> dict[str, Any]:
    """The Lightning checkpoint at ``path``, or a ``ValueError`` naming the file and its fault.

    ``weights_only`` goes to ``torch.load`` (``False`` unpickles any object: trusted files only). A sharded
    checkpoint (the folder ``ModelParallelStrategy`` saves) is gathered into one full checkpoint.

    Example:
        >>> path = Path(tempfile.mkdtemp()) / "model.pt"
        >>> torch.save(torch.nn.Linear(2, 1).state_dict(), path)
        >>> read_checkpoint(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `.../model.pt` holds a bare state dict (...), not a Lightning checkpoint: ...
    """
    path = Path(path)
    if (path / "meta.pt").is_file() and (path / ".metadata").is_file():  # a sharded checkpoint's folder
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as folder:  # every rank's shards of the weights and optimizer state, joined
            dcp_to_torch_save(path, Path(folder) / "full.pt")
            tensors = torch.load(Path(folder) / "full.pt", map_location="cpu", weights_only=weights_only)
        checkpoint = torch.load(path / "meta.pt", map_location="cpu", weights_only=weights_only)  # all but tensors
        optimizers = sorted((key for key in tensors if key.startswith("optimizer_")), key=lambda key: int(key[10:]))
        checkpoint["optimizer_states"] = [tensors.pop(key) for key in optimizers]  # Lightning's full layout
        return {**checkpoint, **tensors}  # with the gathered "state_dict"
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint `{path}` {'is a folder' if path.is_dir() else 'does not exist'}.")
    with path.open("rb") as file:
        head = file.read(64)
    if not head:
        raise ValueError(f"`{path}` is empty (0 bytes): its writing never finished, so it holds no checkpoint.")
    if head.startswith(b"version https://git-lfs"):
        raise ValueError(f"`{path}` is a git-lfs pointer, not the checkpoint itself: fetch it with `git lfs pull`.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as error:  # torch raises whatever its unpickler or zip reader met
        message = f"`{path}` cannot be read as a checkpoint: {type(error).__name__}: {error}."
        if not zipfile.is_zipfile(path):
            message += " It may be truncated (a copy or download cut short) or not a checkpoint."
        raise ValueError(message) from error
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        return checkpoint
    if isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"`{path}` holds a bare state dict (`torch.save(model.state_dict())`), not a Lightning "
                         "checkpoint: load it with `model.load_state_dict(torch.load(path))` (into a plain model: "
                         "`lightning_wn.fold_state_dict(torch.load(path))`), or save one with "
                         "`trainer.save_checkpoint(path)`.")
    found = (f"dict with keys {sorted(map(str, checkpoint))[:8]}" if isinstance(checkpoint, dict)
             else type(checkpoint).__name__)
    raise ValueError(f"`{path}` is not a Lightning checkpoint (a dict with a 'state_dict'): it holds a {found}.")


def load_from_checkpoint(model_class: type, path: str | PathLike, **kwargs: Any) -> Any:
    """``model_class.load_from_checkpoint(path)`` (a LightningModule class) of a weight-normalized checkpoint,
    folded into plain weights, trained: a later fit's data-dependent init keeps the layers it loaded."""
    checkpoint = read_checkpoint(path, weights_only=False)
    checkpoint["state_dict"] = fold_state_dict(checkpoint["state_dict"])
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    model = model_class.load_from_checkpoint(buffer, **kwargs)
    for name, module in model.named_modules():  # marked as the init marks them: the layers that hold what was saved
        saved = checkpoint["state_dict"].get(f"{name}.weight".lstrip("."))  # not a new head (`strict=False`)
        if saved is not None and isinstance(module, SUPPORTED_LAYERS) and _holds(module.weight, saved):
            setattr(module, INITIALIZED, True)  # recurrent layers have no `weight`, and the init skips them
    return model


@torch.no_grad()
def _holds(weight: torch.Tensor, saved: torch.Tensor) -> bool:
    # a weight split into g and v on loading computes the saved one back to rounding (bfloat16's, for a cast model)
    return weight.shape == saved.shape and torch.allclose(weight, saved.to(weight), 1e-2, 1e-6)


class FoldWeightNormOnLoad:
    """LightningModule mixin: ``Model.load_from_checkpoint`` folds the ``g`` and ``v`` it lacks into plain weights.

    Put it first in the bases: ``class Model(FoldWeightNormOnLoad, LightningModule)``.
    """

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        if "state_dict" in checkpoint:  # absent when ModelParallelStrategy loaded the weights into the model itself
            own = self.state_dict().keys()  # type: ignore[attr-defined]
            checkpoint["state_dict"] = fold_state_dict(checkpoint["state_dict"], keep=own)
