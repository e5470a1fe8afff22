"""The weight a normalized layer hands out: ``layer.weight`` read by code outside the layer's forward.

It is computed from ``g`` and ``v``, so a write into it would be lost; :class:`ComputedWeight` refuses
in-place writes as they happen, into itself, its views (``nn.init.orthogonal_`` writes through
``view_as``) and ``.data``, which is a new tensor with a version counter of its own that no later
check could see. Every other op runs as on a plain tensor and returns plain tensors, so the layer's
math and autograd are untouched.

Example:
    >>> import torch
    >>> w = torch.randn(3, 4).as_subclass(ComputedWeight)
    >>> (w * 2).sum().shape, type(w + 1).__name__
    (torch.Size([]), 'Tensor')
    >>> w.data.normal_()
    Traceback (most recent call last):
    ...
    RuntimeError: A weight-normalized layer's weight was written in place, ...
"""

from __future__ import annotations

import torch

WRITTEN_WEIGHT = (
    "A weight-normalized layer's weight was written in place, but it is computed from g and v, so the "
    "write would be lost. Re-initialize the layer with `layer.reset_parameters()`, or set a weight W "
    "with `layer.weight = W` (g and v are then set to give W)."
)

# methods ending in "_" that change no values
_NOT_WRITES = frozenset({"requires_grad_", "share_memory_", "retain_grad", "pin_memory"})
_WRITING_DUNDERS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                              "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__",
                              "__imatmul__"})  # fmt: skip


class ComputedWeight(torch.Tensor):
    """A computed weight: reads as a plain tensor, refuses writes into itself (``nn.init.*_``, ``.data``)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _writes_into(cls, func, args, kwargs):
            raise RuntimeError(WRITTEN_WEIGHT)
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if _property(func) == ("data", "__get__"):  # `.data` shares the storage but not the version counter
            return out.as_subclass(cls)
        if args and isinstance(args[0], cls):  # views of it (view_as, [i], chunk) refuse writes too
            if isinstance(out, torch.Tensor):
                return _guarded_if_view(cls, out, args[0])
            if isinstance(out, tuple) and out and all(isinstance(o, torch.Tensor) for o in out):
                return tuple(_guarded_if_view(cls, o, args[0]) for o in out)
        return out


def _guarded_if_view(cls: type, out: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    if out._is_view() and out.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
        return out.as_subclass(cls)
    return out


def _property(func) -> tuple[str, str] | None:
    """``("data", "__get__")`` for ``Tensor.data``'s getter, and so on; None for other functions."""
    owner = getattr(func, "__self__", None)
    name = getattr(func, "__name__", "")
    return (getattr(owner, "__name__", ""), name) if name in ("__get__", "__set__") else None


def _writes_into(cls: type, func, args: tuple, kwargs: dict) -> bool:
    outs = kwargs.get("out")
    if any(isinstance(out, cls) for out in (outs if isinstance(outs, (tuple, list)) else (outs,))):
        return True
    target = args[0] if args else kwargs.get("tensor")  # nn.init passes its tensor by keyword
    if not isinstance(target, cls):  # a write into another tensor that reads this one (other.copy_(w))
        return False
    accessor = _property(func)
    if accessor is not None:
        return accessor == ("data", "__set__")
    name = getattr(func, "__name__", "")
    return name in _WRITING_DUNDERS or (name.endswith("_") and not name.startswith("__") and name not in _NOT_WRITES)
