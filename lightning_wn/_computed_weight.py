"""The weight a normalized layer hands out: ``layer.weight`` read by code outside the layer's forward."""

from __future__ import annotations

import torch

WRITTEN_WEIGHT = ("A weight-normalized layer's weight was written in place, but it is computed from g and v, so the "
                  "write would be lost. Re-initialize with `layer.reset_parameters()`, or assign `layer.weight = W`.")

_NOT_WRITES = frozenset({"requires_grad_", "share_memory_"})  # names ending in "_" that write nothing into it
_IN_PLACE_OPS = "add sub mul truediv floordiv mod pow and or xor lshift rshift matmul".split()
_WRITING_DUNDERS = frozenset({"__setitem__", *(f"__i{op}__" for op in _IN_PLACE_OPS)})
_DATA_GET, _DATA_SET = torch.Tensor.data.__get__, torch.Tensor.data.__set__  # reading, setting `.data`


class ComputedWeight(torch.Tensor):
    """A weight computed from ``g`` and ``v``, so that a write into it would be lost: refuses in-place writes.

    Writes are refused as they happen: into itself, its views (``nn.init.orthogonal_`` writes through
    ``view_as``), ``detach()`` and ``.data`` (new tensors with version counters of their own, which no later
    check could see). Every other op runs and returns as on a plain tensor: the layer's math and autograd are untouched.

    Example:
        >>> w = torch.randn(3, 4).as_subclass(ComputedWeight)
        >>> type(w + 1).__name__
        'Tensor'
        >>> w.data.normal_()
        Traceback (most recent call last):
        ...
        RuntimeError: A weight-normalized layer's weight was written in place, ...
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _writes_into(cls, func, args, kwargs):
            raise RuntimeError(WRITTEN_WEIGHT)
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if func == _DATA_GET:
            return out.as_subclass(cls)  # `.data` shares the storage but not the version counter
        if args and isinstance(args[0], cls) and out is not args[0]:  # views of it (view_as, [i], chunk) refuse writes
            if isinstance(out, torch.Tensor):  # too; a method returning the tensor itself (requires_grad_) returns it
                return _guarded_if_alias(cls, out, args[0], func)
            if isinstance(out, tuple) and out and all(isinstance(o, torch.Tensor) for o in out):
                return type(out)(_guarded_if_alias(cls, o, args[0], func) for o in out)  # max(0).values
        return out

    # a copy, or a tensor saved to a file, is a new tensor, the user's to write: a plain one (torch.load's
    # weights_only refuses subclasses)
    def __deepcopy__(self, memo: dict) -> torch.Tensor:
        return self.as_subclass(torch.Tensor).__deepcopy__(memo)

    def __reduce_ex__(self, protocol: int):
        return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)


def _guarded_if_alias(cls: type, out: torch.Tensor, source: torch.Tensor, func) -> torch.Tensor:
    aliases = out._is_view() or func in (torch.Tensor.detach, torch.detach)  # detach shares storage, not as a view
    shared = aliases and out.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()
    return out.as_subclass(cls) if shared else out


def _writes_into(cls: type, func, args: tuple, kwargs: dict) -> bool:
    outs = kwargs.get("out")
    if any(isinstance(out, cls) for out in (outs if isinstance(outs, (tuple, list)) else (outs,))):
        return True
    target = args[0] if args else kwargs.get("tensor")  # nn.init passes its tensor by keyword
    if not isinstance(target, cls):  # a write into another tensor that reads this one (other.copy_(w))
        return False
    name = getattr(func, "__name__", "")
    writer = name in _WRITING_DUNDERS or (name.endswith("_") and not name.startswith("__") and name not in _NOT_WRITES)
    return writer or func == _DATA_SET
