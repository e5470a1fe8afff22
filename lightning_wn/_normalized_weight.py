r"""``w = g * v / ||v||`` as one autograd node, exact to the second derivative."""

from __future__ import annotations

import torch
from torch import Tensor


def norm_axes(v: Tensor, dim: int) -> list[int]:
    """The axes the norm runs over: all but ``dim`` (``-1``: all of them; a 1-D ``v`` is one unit).

    Example:
        >>> norm_axes(torch.ones(2, 3, 4), 1), norm_axes(torch.ones(2, 3), -1), norm_axes(torch.ones(5), 0)
        ([0, 2], [0, 1], [0])
    """
    return [axis for axis in range(v.dim()) if axis != dim] or list(range(v.dim()))


class NormalizedWeight(torch.autograd.Function):
    r"""``w = g * v / ||v||`` with the norm over every axis of ``v`` but ``dim`` (``-1``: one norm).

    ``magnitude`` is ``g``, or ``s`` with :math:`g = e^{c s}` where ``log_scale_factor`` ``c`` is given.

    Forward and backward take ATen's fused kernels, the ones torch's own weight norm uses, where they
    apply (the norm over every axis but the first or the last of a contiguous ``v``). Elsewhere
    :math:`\nabla_g = \langle \nabla_w, v \rangle / \lVert v \rVert` and
    :math:`\nabla_v = \frac{g}{\lVert v \rVert} \big( \nabla_w - \frac{\nabla_g}{\lVert v \rVert} v \big)`.

    Example:
        >>> v, g = torch.randn(2, 3), torch.rand(2, 1)
        >>> torch.allclose(NormalizedWeight.apply(v, g, 0).norm(dim=1, keepdim=True), g)
        True
    """

    @staticmethod
    def forward(ctx, v: Tensor, magnitude: Tensor, dim: int, log_scale_factor: float | None = None) -> Tensor:
        # kept, not saved: a w reused inside lightning_wn.cached() may serve several forward passes whose losses are
        # backpropagated separately (loss_a.backward(); loss_b.backward()); versions are checked as autograd would.
        # g = exp(c * s) is taken here too: an exp node of its own would free its saved output at the first backward
        ctx.v, ctx.magnitude, ctx.dim, ctx.c = v, magnitude, dim, log_scale_factor
        ctx.versions = v._version, magnitude._version
        g = g_from(magnitude, log_scale_factor)
        ctx.fused = v.dim() > 1 and dim in (0, v.dim() - 1) and v.dtype == g.dtype  # the norm in float32 or wider
        ctx.fused = ctx.fused and v.is_contiguous() and g.is_contiguous()  # ATen's kernels misread channels_last
        if ctx.fused:
            weight, ctx.norm = torch._weight_norm_interface(v, g, dim)
            return weight
        ctx.norm = torch.linalg.vector_norm(v, dim=norm_axes(v, dim), keepdim=True)
        return v * (g / ctx.norm)

    @staticmethod
    def backward(ctx, grad_w: Tensor):
        v, magnitude, c, norm, axes = ctx.v, ctx.magnitude, ctx.c, ctx.norm, norm_axes(ctx.v, ctx.dim)
        if (v._version, magnitude._version) != ctx.versions:
            raise RuntimeError("g or v of a weight-normalized layer was modified in place (an optimizer step?) between "
                               "the forward pass and its backward. Call backward before stepping, or redo the forward.")
        g = g_from(magnitude, c)  # under create_graph, part of the graph
        if torch.is_grad_enabled():
            # create_graph (gradient penalties): ctx.norm was computed outside the graph, and ATen's differentiable
            # backward drops the gradient sent to the norm it saves, so the part through ||v|| would be lost
            norm = torch.linalg.vector_norm(v, dim=axes, keepdim=True)
        elif ctx.fused:
            fused_backward = torch.ops.aten._weight_norm_interface_backward.default
            grad_v, grad_g = fused_backward(grad_w.contiguous(), v, g, norm, ctx.dim)
            return grad_v, grad_g if c is None else grad_g * (c * g), None, None
        wide = torch.promote_types(v.dtype, torch.float32)  # float16's grad_w * v over- and underflows
        grad_w, v, g, norm = (t.to(wide) for t in (grad_w, v, g, norm))  # no copies in float32 and float64
        grad_g = (grad_w * v).sum(dim=axes, keepdim=True) / norm
        # the component of grad_w along v does not reach v: w does not depend on ||v||. Divided by ||v|| twice, not
        # by ||v||^3, which overflows (or underflows) in float32
        grad_v = torch.addcmul(grad_w, v, grad_g / norm, value=-1).mul_(g / norm)
        grad_g = grad_g.reshape(g.shape)
        grad_magnitude = grad_g if c is None else grad_g * (c * g)  # d exp(c s) / ds = c g
        return grad_v.to(ctx.v.dtype), grad_magnitude.to(magnitude.dtype), None, None


def g_from(magnitude: Tensor, log_scale_factor: float | None) -> Tensor:
    """``g`` from the learned magnitude: ``g`` itself, or ``exp(c * s)`` with ``c = log_scale_factor``."""
    return magnitude if log_scale_factor is None else torch.exp(log_scale_factor * magnitude)
