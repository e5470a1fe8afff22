"""Which tensors of the training batches the data-dependent init feeds to ``forward``, and how many examples."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

Inputs = Tensor | tuple[Tensor, ...] | dict[str, Tensor]  # forward(x), forward(*x), forward(**x)


def model_inputs(batch: Any, input_key: int | str | list[int | str] | None) -> Inputs:
    """The model input(s) in ``batch`` at ``input_key``: a list of keys gives a tuple, ``forward(*inputs)``.

    Example:
        >>> model_inputs({"mel": torch.ones(2, 3), "label": torch.zeros(2)}, "mel").shape
        torch.Size([2, 3])
    """
    if isinstance(input_key, list):
        return tuple(model_inputs(batch, key) for key in input_key)
    try:
        x = batch if input_key is None and isinstance(batch, Tensor) else batch[0 if input_key is None else input_key]
    except (KeyError, IndexError, TypeError):
        x = None
    if not isinstance(x, Tensor):
        shown = f" (keys: {sorted(map(str, batch))})" if isinstance(batch, dict) else ""
        shown = f" (length {len(batch)})" if isinstance(batch, (tuple, list)) else shown
        found = "" if x is None else f", which holds a {type(x).__name__} there"
        raise ValueError(f"WeightNormalization cannot find the model input at `input_key`={input_key!r} in a batch "
                         f"of type {type(batch).__name__}{shown}{found}. Set `input_key` to the index or key of the "
                         "input tensor, or define `data_init_inputs(batch)` on the LightningModule to return it.")
    return x


def first_examples(batches: Iterable[Any], wanted: int, where: str) -> tuple[Inputs, int]:
    """The first ``wanted`` examples of ``batches`` in their form (a tensor, or tuples, lists and dicts of them,
    nested), and their count. ``where`` names, in errors, what gave the batches.

    Example:
        >>> batches = [{"x": torch.ones(4, 2), "context": (torch.zeros(4),)}] * 3
        >>> inputs, count = first_examples(batches, 10, "the loader")
        >>> inputs["x"].shape, inputs["context"][0].shape, count
        (torch.Size([10, 2]), torch.Size([10]), 10)
    """
    chunks, count, shapes = [], 0, None
    for inputs in batches:
        entries = dict(named_leaves(inputs))
        for name, value in entries.items():
            if not isinstance(value, Tensor) or value.dim() == 0:
                shown = "a 0-d tensor" if isinstance(value, Tensor) else f"a {type(value).__name__}"
                raise ValueError(f"{where} gave{'' if name is None else f' entry {name!r}'} {shown}; the "
                                 "data-dependent init needs tensors with a batch axis first (a tensor, or tuples, "
                                 "lists and dicts of them).")
        sizes = {name: len(value) for name, value in entries.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"{where} gave tensors with different batch sizes {sizes}, or none; every model input "
                             "must hold the same examples along its first axis.")
        batch_shapes = {name: tuple(value.shape[1:]) for name, value in entries.items()}
        shapes = batch_shapes if shapes is None else shapes
        if missing := [name for name in shapes if name not in batch_shapes]:
            raise ValueError(f"{where} gave a batch without entry {missing[0]!r}, which the first batch had; the "
                             "data-dependent init joins batches of one form.")
        if changed := [name for name, shape in batch_shapes.items() if shapes.get(name, shape) != shape]:
            name = changed[0]
            entry = "" if name is None else f"entry {name!r}: "
            raise ValueError(f"{where} gave batches whose tensors differ beyond the batch axis ({entry}"
                             f"{shapes[name]}, then {batch_shapes[name]}; padded per batch?), so the data-dependent "
                             f"init cannot join them into {wanted} examples (per process). Set `init_samples` to at "
                             "most one batch's size, or pad every batch to one length.")
        chunks.append(inputs)
        count += next(iter(sizes.values()))
        if count >= wanted:
            break
    if not chunks:
        raise ValueError("The training dataloader is empty: no examples for the data-dependent init.")
    return _joined(chunks, wanted), min(count, wanted)


def named_leaves(inputs: Any, path: tuple = ()) -> Iterator[tuple[Any, Any]]:
    """``(name, leaf)`` in nested tuples, lists and dicts: a key or index, a tuple of them deeper, None at the top."""
    if isinstance(inputs, (tuple, list, dict)):
        for key, value in inputs.items() if isinstance(inputs, dict) else enumerate(inputs):
            yield from named_leaves(value, (*path, key))
    else:
        yield path[0] if len(path) == 1 else path or None, inputs


def _joined(chunks: list[Any], wanted: int) -> Any:
    """The chunks' tensors joined along the batch axis and cut to ``wanted``, in the chunks' containers."""
    first = chunks[0]
    if isinstance(first, Tensor):
        return torch.cat(chunks)[:wanted]
    if isinstance(first, dict):  # a copy keeps the dict's class and what its constructor took (a defaultdict's)
        joined = copy.copy(first)
        joined.update({key: _joined([chunk[key] for chunk in chunks], wanted) for key in first})
        return joined
    joined = [_joined([chunk[i] for chunk in chunks], wanted) for i in range(len(first))]
    return type(first)(*joined) if hasattr(first, "_fields") else type(first)(joined)  # a namedtuple takes fields
