"""The paper's fast path for a weight-normalized ``Linear``: scale the output, not the weight.

``y = (x @ v.T) * (g / ||v||) + b`` never materializes ``w``. When the batch has fewer rows
than the layer has inputs, the extra work on the (rows x out) output is smaller than the extra
work on the (out x in) weight, and the backward folds the norm's gradient into the matmul's
gradient in place instead of adding two weight-sized tensors. Under ``create_graph`` (gradient
penalties) the backward is built from differentiable ops on ``x``, ``v`` and ``g`` instead: the
scale and norm saved by the forward were computed outside the graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class ScaledLinear(torch.autograd.Function):
    """``y = (x @ v.T) * g / ||v|| + b`` with ``||v||`` taken over each row of ``v``.

    Example:
        >>> x, v, g = torch.randn(3, 4), torch.randn(2, 4), torch.rand(2, 1)
        >>> w = g * v / v.norm(dim=1, keepdim=True)
        >>> torch.allclose(ScaledLinear.apply(x, v, g, None), x @ w.T, atol=1e-6)
        True
    """

    @staticmethod
    def forward(ctx, x: Tensor, v: Tensor, g: Tensor, bias: Tensor | None) -> Tensor:
        norm = torch.linalg.vector_norm(v, dim=1)
        scale = g.reshape(-1) / norm
        unscaled = F.linear(x, v)
        out = unscaled * scale if bias is None else torch.addcmul(bias, unscaled, scale)
        ctx.save_for_backward(x, v, g, scale, norm, unscaled)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, v, g, scale, norm, unscaled = ctx.saved_tensors
        need_x, need_v, need_g, need_bias = ctx.needs_input_grad
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        if torch.is_grad_enabled():  # create_graph: the saved scale and norm have no graph to differentiate
            return _differentiable_grads(grad_rows, x, v, g, ctx.needs_input_grad)
        grad_unscaled = grad_rows * scale
        grad_g = torch.linalg.vecdot(grad_rows, unscaled.reshape(grad_rows.shape), dim=0).div_(norm)
        grad_x = grad_v = grad_bias = None
        if need_x:
            grad_x = (grad_unscaled @ v).reshape(x.shape)
        if need_v:
            grad_v = grad_unscaled.T @ x.reshape(-1, x.shape[-1])
            # d(g/||v||)/dv = -g * v / ||v||^3, added in place: no second weight-sized tensor
            grad_v.addcmul_(v, (grad_g * scale).div_(norm).unsqueeze(1), value=-1)
        if need_bias:
            grad_bias = grad_rows.sum(0)
        return grad_x, grad_v, grad_g.reshape(g.shape) if need_g else None, grad_bias


def _differentiable_grads(grad_rows: Tensor, x: Tensor, v: Tensor, g: Tensor, needs: tuple[bool, ...]):
    """:meth:`ScaledLinear.backward` from out-of-place ops on tensors in the graph, so that it can be differentiated."""
    need_x, need_v, need_g, need_bias = needs
    x_rows = x.reshape(-1, x.shape[-1])
    norm = torch.linalg.vector_norm(v, dim=1)
    scale = g.reshape(-1) / norm
    grad_unscaled = grad_rows * scale
    grad_g = (grad_rows * (x_rows @ v.T)).sum(0) / norm
    grad_x = (grad_unscaled @ v).reshape(x.shape) if need_x else None
    grad_v = grad_unscaled.T @ x_rows - v * (grad_g * scale / norm).unsqueeze(1) if need_v else None
    grad_bias = grad_rows.sum(0) if need_bias else None
    return grad_x, grad_v, grad_g.reshape(g.shape) if need_g else None, grad_bias
