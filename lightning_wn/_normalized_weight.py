"""``w = g * v / ||v||`` as one autograd node that can be backpropagated through more than once.

The node keeps ``v`` and ``g`` as plain attributes instead of ``save_for_backward``: they are
parameters that live anyway, and keeping them lets a cached ``w`` serve several forward passes
whose losses are backpropagated separately (``loss_a.backward(); loss_b.backward()``).
``on_backward`` runs when the gradient arrives: the owner drops its cache there.

Second derivatives (gradient penalties, ``create_graph=True``) take :func:`weight_norm_grads`,
built from differentiable ops on ``v`` and ``g``. ATen's fused op needs the same fix: its
``create_graph`` backward reads the norm it saved as an output of its own node, a node that drops
the gradient sent to that output, so the part of the second derivative that flows through
``||v||`` is lost (``gradgradcheck`` fails for dim 0 and the last axis, the axes it fuses). This
module registers :func:`weight_norm_grads` as the kernel of that backward,
``aten::_weight_norm_differentiable_backward``, which ATen calls only under ``create_graph``:
ordinary backward passes, ours and torch's, do not change.
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


def weight_norm_grads(grad_w: Tensor, v: Tensor, g: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    r"""The gradients of ``v`` and ``g`` from the gradient of ``w = g * v / ||v||``, twice differentiable.

    .. math:: \nabla_g = \frac{\langle \nabla_w, v \rangle}{\lVert v \rVert}, \qquad
              \nabla_v = \frac{g}{\lVert v \rVert} \Big( \nabla_w
              - \frac{\langle \nabla_w, v \rangle}{\lVert v \rVert^2} v \Big)

    ``||v||`` is recomputed from ``v`` so that it is part of the graph being built.

    Example:
        >>> v, g = torch.randn(2, 3, requires_grad=True), torch.rand(2, 1, requires_grad=True)
        >>> w = g * v / v.norm(dim=1, keepdim=True)
        >>> grad_w = torch.randn(2, 3)
        >>> expected = torch.autograd.grad(w, (v, g), grad_w)
        >>> all(torch.allclose(a, b, atol=1e-6) for a, b in zip(weight_norm_grads(grad_w, v, g, 0), expected))
        True
    """
    # a 1-D v is one unit here, as in norm_except_dim
    return _grads_over(grad_w, v, g, [axis for axis in range(v.dim()) if axis != dim] or list(range(v.dim())))


def _grads_over(grad_w: Tensor, v: Tensor, g: Tensor, axes: list[int]) -> tuple[Tensor, Tensor]:
    """:func:`weight_norm_grads` with the norm taken over ``axes`` (none: each entry its own unit)."""
    norm = torch.linalg.vector_norm(v, dim=axes, keepdim=True) if axes else v.abs()
    dot = (grad_w * v).sum(dim=axes, keepdim=True) if axes else grad_w * v
    grad_g = dot / norm
    grad_v = (g.reshape(norm.shape) / norm) * (grad_w - v * (grad_g / norm))
    return grad_v.to(v.dtype), grad_g.reshape(g.shape).to(g.dtype)


def _aten_differentiable_backward(grad_w: Tensor, v: Tensor, g: Tensor, norms: Tensor, dim: int):
    # `norms` is not used: its gradient would be dropped (see the module docstring). ATen's convention:
    # the norm runs over every axis but `dim`, so a 1-D v has one unit per entry
    return _grads_over(grad_w, v, g, [axis for axis in range(v.dim()) if axis != dim])


_ATEN_FIX = torch.library.Library("aten", "IMPL")  # kept alive: the kernel lives as long as this object
_ATEN_FIX.impl("_weight_norm_differentiable_backward", _aten_differentiable_backward, "CompositeImplicitAutograd")


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
        # ATen fuses dim 0 and the last axis; a 1-D v is one unit, which it would read as one unit per entry
        ctx.fused = v.dim() > 1 and dim in (0, v.dim() - 1) and v.dtype in (torch.float32, torch.float64)
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
        if torch.is_grad_enabled():  # create_graph: ctx.norm was computed outside the graph
            return *weight_norm_grads(grad_w, v, g, ctx.dim), None, None
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
