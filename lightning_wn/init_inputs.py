"""Which tensors of the training batches the data-dependent init feeds to ``forward``, and how many examples."""

from __future__ import annotations

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
    if isinstance(input_key, list):  # several inputs: forward(*inputs)
        return tuple(model_inputs(batch, key) for key in input_key)
    shown = f" (keys: {sorted(map(str, batch))})" if isinstance(batch, dict) else ""
    shown = f" (length {len(batch)})" if isinstance(batch, (tuple, list)) else shown
    try:
        x = batch if input_key is None and isinstance(batch, Tensor) else batch[0 if input_key is None else input_key]
    except (KeyError, IndexError, TypeError) as error:
        raise ValueError(
            f"WeightNormalization cannot find the model input at `input_key`={input_key!r} in a batch "
            f"of type {type(batch).__name__}{shown}. Set `input_key` to the index or key of the input tensor."
        ) from error
    if not isinstance(x, Tensor):
        raise ValueError(
            f"The model input at `input_key`={input_key!r} is a {type(x).__name__}, not a tensor. "
            f"Set `input_key` to the index or key of the input tensor{shown}."
        )
    return x


def example_count(inputs: Any, where: str) -> int:
    """The batch size of one batch of model inputs; every tensor in it must have it."""
    entries = dict(enumerate(inputs)) if isinstance(inputs, (tuple, list)) else {None: inputs}
    entries = inputs if isinstance(inputs, dict) else entries
    for name, value in entries.items():
        if not isinstance(value, Tensor) or value.dim() == 0:
            shown = "a 0-d tensor" if isinstance(value, Tensor) else f"a {type(value).__name__}"
            raise ValueError(
                f"{where} gave{'' if name is None else f' entry {name!r}'} {shown}; the data-dependent init needs "
                "tensors with a batch axis first (a tensor, a tuple or a dict of them)."
            )
    sizes = {name: len(value) for name, value in entries.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(
            f"{where} gave tensors with different batch sizes {sizes}, or none; every model input must hold the "
            "same examples along its first axis."
        )
    return next(iter(sizes.values()))


def concatenate(chunks: list[Any], wanted: int) -> Inputs:
    """The first ``wanted`` examples of the batches ``chunks``, in their form (a tensor, a tuple or a dict)."""
    first = chunks[0]
    if isinstance(first, Tensor):
        return torch.cat(chunks)[:wanted]
    keys = first.keys() if isinstance(first, dict) else range(len(first))
    joined = {key: torch.cat([chunk[key] for chunk in chunks])[:wanted] for key in keys}
    return joined if isinstance(first, dict) else tuple(joined.values())
