"""An explicit, scoped cache of normalized weights: ``with lightning_wn.cached(): ...``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from torch.optim.optimizer import register_optimizer_step_post_hook


class _Cache(dict):
    """The entries of one ``cached()`` block, by module; closed when the block exits, though a context copied
    inside it (an asyncio task, ``contextvars.copy_context()``) still holds it."""

    open = True


_active: ContextVar[_Cache | None] = ContextVar("lightning_wn_cache", default=None)


def active_cache() -> _Cache | None:
    """The cache of the innermost open ``cached()`` block, or None outside one."""
    cache = _active.get()
    return cache if cache is not None and cache.open else None


@contextmanager
def cached() -> Iterator[None]:
    """Compute each normalized weight ``w = g * v / ||v||`` once inside this block, not at each read.

    An entry serves only while made from the very same ``g`` and ``v`` tensors and storage, at the same
    versions and in the same grad mode, and until an optimizer steps (fused optimizers bump no version);
    it dies with the block, and nested blocks share the outer one. A write through ``.data``, or a
    collective into a parameter (``dist.broadcast``), is seen by none of these: make it outside the block.
    ``WeightNormalization`` enters it around every step.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_wn import weight_norm
        >>> cell = weight_norm(nn.LSTMCell(4, 8))
        >>> x, h = torch.randn(2, 4), (torch.zeros(2, 8), torch.zeros(2, 8))
        >>> with cached():
        ...     for _ in range(10):  # weight_ih and weight_hh are computed once, not 10 times
        ...         h = cell(x, h)
        >>> h[0].shape
        torch.Size([2, 8])
    """
    if active_cache() is not None:
        yield
        return
    cache = _Cache()
    token, stepped = _active.set(cache), register_optimizer_step_post_hook(lambda *args: cache.clear())
    try:
        yield
    finally:
        cache.open = False
        cache.clear()
        stepped.remove()
        _active.reset(token)
