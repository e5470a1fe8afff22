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
        return tuple(_one_input(batch, key) for key in input_key)
    return _one_input(batch, input_key)


def _one_input(batch: Any, key: int | str | None) -> Tensor:
    try:
        if key is None:
            x = batch if isinstance(batch, Tensor) else batch[0]
        else:
            x = batch[key]
    except (KeyError, IndexError, TypeError) as error:
        raise ValueError(
            f"WeightNormalization cannot find the model input at `input_key`={key!r} in a batch "
            f"of type {type(batch).__name__}{_describe(batch)}. Set `input_key` to the index or "
            "key of the input tensor."
        ) from error
    if not isinstance(x, Tensor):
        raise ValueError(
            f"The model input at `input_key`={key!r} is a {type(x).__name__}, not a tensor. "
            f"Set `input_key` to the index or key of the input tensor{_describe(batch)}."
        )
    return x


def example_count(inputs: Any, where: str) -> int:
    """The batch size of one batch of model inputs; every tensor in it must have it."""
    entries = dict(inputs) if isinstance(inputs, dict) else dict(enumerate(inputs)) if isinstance(inputs, (tuple, list)) else {None: inputs}
    for name, value in entries.items():
        if not isinstance(value, Tensor) or value.dim() == 0:
            entry = "" if name is None else f" entry {name!r}"
            shown = "a 0-d tensor" if isinstance(value, Tensor) else f"a {type(value).__name__}"
            raise ValueError(
                f"{where} gave{entry} {shown}; the data-dependent init needs tensors with a batch axis first "
                "(a tensor, a tuple or a dict of them)."
            )
    sizes = {name: len(value) for name, value in entries.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(
            f"{where} gave tensors with different batch sizes {sizes}, or none; every model input must hold the "
            "same examples along its first axis."
        )
    return next(iter(sizes.values()))


def concatenate(chunks: list[Any], wanted: int) -> Inputs:
    first = chunks[0]
    keys = first.keys() if isinstance(first, dict) else range(len(first)) if isinstance(first, (tuple, list)) else None
    if keys is None:
        return torch.cat(chunks)[:wanted]
    joined = {key: torch.cat([chunk[key] for chunk in chunks])[:wanted] for key in keys}
    return joined if isinstance(first, dict) else tuple(joined.values())


def _describe(batch: Any) -> str:
    if isinstance(batch, dict):
        return f" (keys: {sorted(map(str, batch))})"
    if isinstance(batch, (tuple, list)):
        return f" (length {len(batch)})"
    return ""
