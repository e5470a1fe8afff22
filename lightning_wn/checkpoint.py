"""Reading a Lightning checkpoint file, with one clear error when the file is not one.

A checkpoint that went wrong on its way to disk (an empty file, a copy cut short, a git-lfs
pointer left by a clone without ``git lfs pull``, a bare ``torch.save(model.state_dict())``)
otherwise surfaces as ``EOFError``, ``UnpicklingError`` or ``KeyError: 'state_dict'`` from deep
inside torch or Lightning, naming neither the file nor the fault.
"""

from __future__ import annotations

import tempfile
import zipfile
from os import PathLike
from pathlib import Path
from typing import Any

import torch

_LFS_POINTER = b"version https://git-lfs"


def read_checkpoint(path: str | PathLike, *, weights_only: bool = True) -> dict[str, Any]:
    """The Lightning checkpoint at ``path``; a ``ValueError`` naming the file and its fault otherwise.

    ``weights_only`` is passed to ``torch.load`` (``False`` unpickles any object: trusted files only).
    A sharded checkpoint (the folder ``ModelParallelStrategy`` saves) is gathered into one full checkpoint.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "model.pt"
        >>> torch.save(torch.nn.Linear(2, 1).state_dict(), path)
        >>> read_checkpoint(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `.../model.pt` holds a bare state dict (`torch.save(model.state_dict())`), not a Lightning checkpoint: ...
    """
    path = Path(path)
    if path.is_dir() and (path / _SHARDED_METADATA).is_file() and (path / _SHARDED_INDEX).is_file():
        return _read_sharded(path, weights_only)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint `{path}` {'is a folder' if path.is_dir() else 'does not exist'}.")
    with path.open("rb") as file:
        head = file.read(len(_LFS_POINTER))
    if not head:
        raise ValueError(f"`{path}` is empty (0 bytes): its writing never finished, so it holds no checkpoint.")
    if head == _LFS_POINTER:
        raise ValueError(f"`{path}` is a git-lfs pointer, not the checkpoint itself: fetch it with `git lfs pull`.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as error:  # torch raises whatever its unpickler or zip reader met
        cut = "" if zipfile.is_zipfile(path) else " It may be truncated (a copy or download cut short) or not a checkpoint."
        raise ValueError(f"`{path}` cannot be read as a checkpoint: {type(error).__name__}: {error}.{cut}") from error
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        return checkpoint
    if isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(
            f"`{path}` holds a bare state dict (`torch.save(model.state_dict())`), not a Lightning checkpoint: "
            "load it with `model.load_state_dict(torch.load(path))`, or save one with `trainer.save_checkpoint(path)`."
        )
    found = f"a dict with keys {sorted(map(str, checkpoint))[:8]}" if isinstance(checkpoint, dict) else f"a {type(checkpoint).__name__}"
    raise ValueError(f"`{path}` is not a Lightning checkpoint (a dict with a 'state_dict'): it holds {found}.")


_SHARDED_METADATA, _SHARDED_INDEX = "meta.pt", ".metadata"  # Lightning's own file; torch.distributed.checkpoint's


def _read_sharded(path: Path, weights_only: bool) -> dict[str, Any]:
    """The full checkpoint from a sharded one: every rank's shards of the weights and optimizer state, joined."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as folder:
        full = Path(folder) / "full.pt"
        dcp_to_torch_save(path, full)
        tensors = torch.load(full, map_location="cpu", weights_only=weights_only)
    checkpoint = torch.load(path / _SHARDED_METADATA, map_location="cpu", weights_only=weights_only)
    checkpoint["state_dict"] = tensors.pop("state_dict")
    optimizers = sorted((key for key in tensors if key.startswith("optimizer_")), key=lambda key: int(key[10:]))
    checkpoint["optimizer_states"] = [tensors.pop(key) for key in optimizers]  # Lightning's full layout
    checkpoint.update(tensors)
    return checkpoint
