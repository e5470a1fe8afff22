"""``w = g * v / ||v||`` as one autograd node that can be backpropagated through more than once.

The node keeps ``v`` and ``g`` as plain attributes instead of ``save_for_backward``: they are
parameters that live anyway, and keeping them lets a cached ``w`` serve several forward passes
whose losses are backpropagated separately (``loss_a.backward(); loss_b.backward()``).
``on_backward`` runs when the gradient arrives: the owner drops its cache there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def norm_except_dim(v: Tensor, dim: int) -> Tensor:
    """The 2-norm of ``v`` over every axis but ``dim``, kept broadcastable against ``v``.

    Example:
        >>> norm_except_dim(torch.ones(2, 3, 4), dim=1).shape
        torch.Size([1, 3, 1])
    """
    if v.dim() == 1:
        return torch.linalg.vector_norm(v, keepdim=True)
    other_axes = [axis for axis in range(v.dim()) if axis != dim]
    return torch.linalg.vector_norm(v, dim=other_axes, keepdim=True)


class NormalizedWeight(torch.autograd.Function):
    """``w = g * v / ||v||`` with the norm over every axis of ``v`` but ``dim``.

    Example:
        >>> v, g = torch.randn(2, 3), torch.rand(2, 1)
        >>> w = NormalizedWeight.apply(v, g, 0)
        >>> torch.allclose(w.norm(dim=1, keepdim=True), g)
        True
    """

    @staticmethod
    def forward(ctx, v: Tensor, g: Tensor, dim: int, on_backward: Callable[[], None] | None = None) -> Tensor:
        ctx.v, ctx.g, ctx.dim, ctx.on_backward = v, g, dim, on_backward
        ctx.fused = dim in (0, v.dim() - 1) and v.dtype in (torch.float32, torch.float64)
        if ctx.fused:  # ATen's fused kernels, the ones torch's own weight norm uses
            weight, ctx.norm = torch._weight_norm_interface(v, g, dim)
            return weight
        ctx.norm = norm_except_dim(v, dim)
        return v * (g / ctx.norm)

    @staticmethod
    def backward(ctx, grad_w: Tensor):
        v, g, norm = ctx.v, ctx.g, ctx.norm
        if ctx.on_backward is not None:
            ctx.on_backward()
        if ctx.fused:
            grad_v, grad_g = torch.ops.aten._weight_norm_interface_backward(grad_w.contiguous(), v, g, norm, ctx.dim)
            return grad_v, grad_g, None, None
        scale = g / norm
        other_axes = [axis for axis in range(v.dim()) if axis != ctx.dim] or None
        dot = (grad_w * v).sum(dim=other_axes, keepdim=True)
        grad_g = dot / norm
        # the component of grad_w along v does not reach v: w does not depend on ||v||
        grad_v = grad_w * scale
        grad_v.addcmul_(v, -scale * dot / norm.square())
        return grad_v, grad_g, None, None
