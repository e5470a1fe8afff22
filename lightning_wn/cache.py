"""An explicit, scoped cache of normalized weights: ``with lightning_wn.cached(): ...``.

Outside it every read of a normalized weight computes ``w = g * v / ||v||`` afresh. Inside it, each
weight is computed once and reused, so a module called many times in one step (an unrolled
``LSTMCell``) pays for one norm, not one per call. The cache dies with its ``with`` block, and an
entry serves a read only while it was computed from the very same ``g`` and ``v`` tensors, at the
same versions (an optimizer step inside the block recomputes) and in the same grad mode.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from collections.abc import Iterator

from torch import nn

_active: ContextVar[dict[nn.Module, tuple] | None] = ContextVar("lightning_wn_cache", default=None)


@contextmanager
def cached() -> Iterator[None]:
    """Compute each normalized weight once inside this block; nested blocks share the outer cache.

    The ``WeightNormalization`` callback enters it around every training, validation, test and
    predict step; in plain PyTorch, wrap a forward that calls a normalized module many times.

    Example:
        >>> import torch
        >>> from lightning_wn import weight_norm
        >>> cell = weight_norm(nn.LSTMCell(4, 8))
        >>> x, h = torch.randn(2, 4), (torch.zeros(2, 8), torch.zeros(2, 8))
        >>> with cached():
        ...     for _ in range(10):  # weight_ih and weight_hh are computed once, not 10 times
        ...         h = cell(x, h)
        >>> h[0].shape
        torch.Size([2, 8])
    """
    if _active.get() is not None:
        yield
        return
    token = _active.set({})
    try:
        yield
    finally:
        _active.reset(token)


def active_cache() -> dict[nn.Module, tuple] | None:
    """The cache of the innermost :func:`cached` block, or None outside one."""
    return _active.get()
