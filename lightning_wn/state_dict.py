"""Fold weight-normalized entries of a state dict into plain weights, without the model.

A checkpoint trained with weight norm then loads into the plain model class with
``strict=True``: ``<layer>.parametrizations.<name>.original0`` (``g``) and ``original1`` (``v``),
as written by this library or by ``torch.nn.utils.parametrizations.weight_norm``, become
``<layer>.<name> = g * v / ||v||``.
"""

from __future__ import annotations

from collections.abc import Container, Mapping

import torch
from torch import Tensor

from lightning_wn._normalized_weight import NormalizedWeight

_MARK = ".parametrizations."


def fold_state_dict(state_dict: Mapping[str, Tensor], keep: Container[str] = ()) -> dict[str, Tensor]:
    """A copy of ``state_dict`` with every weight-normalized tensor folded into a plain one.

    Entries whose keys are in ``keep`` stay as they are (pass a model's own ``state_dict()``
    keys to fold only what that model does not expect).

    Example:
        >>> from torch import nn
        >>> from lightning_wn import weight_norm
        >>> layer = weight_norm(nn.Linear(3, 2))
        >>> folded = fold_state_dict(layer.state_dict())
        >>> sorted(folded), torch.allclose(folded["weight"], layer.weight)
        (['bias', 'weight'], True)
    """
    folded: dict[str, Tensor] = {}
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        if _MARK in f".{key}" and key not in keep:
            prefix, _, part = key.rpartition(".")
            groups.setdefault(prefix, {})[part] = value
        else:
            folded[key] = value
    for prefix, parts in groups.items():
        owner, _, name = f".{prefix}".rpartition(_MARK)
        if "original1" not in parts or not ({"original0"} <= parts.keys() or {"s", "c"} <= parts.keys()):
            raise ValueError(f"State dict entries under `{prefix}` are not a weight norm's g and v: {sorted(parts)}.")
        v = parts["original1"]
        g = parts["original0"] if "original0" in parts else torch.exp(parts["c"] * parts["s"])
        with torch.no_grad():  # the kernel the normalized layer itself runs: bitwise the same weight
            weight = NormalizedWeight.apply(v, g, _output_axis(g, v))
        folded[f"{owner[1:]}.{name}" if owner else name] = weight
    return folded


def _output_axis(g: Tensor, v: Tensor) -> int:
    """The axis ``g`` was taken along: its one non-singleton axis (any size-1 axis of ``v`` if none)."""
    matching = [d for d in range(v.dim()) if g.shape[d] == v.shape[d]] if g.dim() == v.dim() else []
    wide = [d for d in matching if v.shape[d] > 1]
    if len(wide) == 1:
        return wide[0]
    if not wide and matching:
        return matching[0]  # a single output unit: the norm is over the whole tensor either way
    raise ValueError(f"Cannot tell the output axis of g with shape {tuple(g.shape)} for v with shape {tuple(v.shape)}.")
