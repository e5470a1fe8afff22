"""The paper's fast path for a large weight-normalized ``Linear``: scale the output, not the weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class ScaledLinear(torch.autograd.Function):
    """``y = (x @ v.T) * g / ||v|| + b`` with ``||v||`` over each row of ``v``, never building ``w``.

    For fewer rows than inputs, scaling the (rows x out) output costs less than building the (out x in)
    weight, and the backward folds the norm's gradient into the matmul's in place (docs/benchmarks.md).
    The matmul runs in ``dtype`` (autocast's, for mixed precision), ``||v||`` in ``v``'s own.

    Example:
        >>> x, v, g = torch.randn(3, 4), torch.randn(2, 4), torch.rand(2, 1)
        >>> w = g * v / v.norm(dim=1, keepdim=True)
        >>> torch.allclose(ScaledLinear.apply(x, v, g, None, torch.float32), x @ w.T, atol=1e-6)
        True
    """

    @staticmethod
    def forward(ctx, x: Tensor, v: Tensor, g: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
        norm = torch.linalg.vector_norm(v, dim=1)
        scale = g.reshape(-1) / norm
        x_low, v_low = x.to(dtype), v.to(dtype)
        unscaled = F.linear(x_low, v_low)
        out = unscaled * scale.to(dtype) if bias is None else torch.addcmul(bias.to(dtype), unscaled, scale.to(dtype))
        ctx.save_for_backward(x_low, v, v_low, g, scale, norm, unscaled)
        ctx.dtypes = x.dtype, None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, v, v_low, g, scale, norm, unscaled = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph (gradient penalties): what was saved has no graph, so from v and g
            norm = torch.linalg.vector_norm(v, dim=1)
            scale, v_low = g.reshape(-1) / norm, v.to(x.dtype)
            unscaled = F.linear(x, v_low)
        x_dtype, bias_dtype = ctx.dtypes
        need_x, need_v, need_g, need_bias = ctx.needs_input_grad[:4]
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_unscaled = grad_rows * scale.to(grad_rows.dtype)
        # summed in the norm's precision (float32 under autocast, float64 for float64 layers)
        grad_g = (grad_rows.to(norm.dtype) * unscaled.reshape(grad_rows.shape).to(norm.dtype)).sum(0) / norm
        grad_x = (grad_unscaled @ v_low).reshape(x.shape).to(x_dtype) if need_x else None
        grad_v = None
        if need_v:
            grad_v = (grad_unscaled.T @ x.reshape(-1, x.shape[-1])).to(v.dtype)
            # d(g/||v||)/dv = -g * v / ||v||^3, added in place: no second weight-sized tensor
            grad_v.addcmul_(v, (grad_g * scale / norm).unsqueeze(1), value=-1)
        grad_bias = grad_rows.sum(0).to(bias_dtype) if need_bias else None
        return grad_x, grad_v, grad_g.reshape(g.shape) if need_g else None, grad_bias, None
