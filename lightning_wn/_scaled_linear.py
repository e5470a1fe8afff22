"""The paper's fast path for a large weight-normalized ``Linear``: scale the output, not the weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class ScaledLinear(torch.autograd.Function):
    """``y = (x @ v.T) * g / ||v|| + b`` with ``||v||`` over each row of ``v``, never building ``w``.

    For fewer rows than inputs, scaling the (rows x out) output costs less than building the (out x in)
    weight, and the backward folds the norm's gradient into the matmul's in place (docs/benchmarks.md).
    The matmul runs in ``dtype`` (autocast's, for mixed precision), ``||v||`` in ``v``'s own. Returns ``y``
    and what backward reuses; ``torch.func`` transforms it (``grad``, ``vmap``, ``jvp``).

    Example:
        >>> x, v, g = torch.randn(3, 4), torch.randn(2, 4), torch.rand(2, 1)
        >>> w = g * v / v.norm(dim=1, keepdim=True)
        >>> torch.allclose(ScaledLinear.apply(x, v, g, None, torch.float32)[0], x @ w.T, atol=1e-6)
        True
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, v: Tensor, g: Tensor, bias: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, ...]:
        norm = torch.linalg.vector_norm(v, dim=1)
        v_low = v.to(dtype)
        unscaled = F.linear(x.to(dtype), v_low)
        scale = (g.reshape(-1) / norm).to(dtype)
        out = unscaled * scale if bias is None else torch.addcmul(bias.to(dtype), unscaled, scale)
        # an output may not be an input: where v is in dtype already, backward reads v itself
        return out, norm, unscaled, v_low if v_low is not v else v.new_empty(0)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: tuple[Tensor, ...]) -> None:
        (x, v, g, bias, dtype), (_, norm, unscaled, v_low) = inputs, output
        ctx.mark_non_differentiable(norm, unscaled, v_low)
        saved = x, v, g, norm, unscaled, v_low if v_low.numel() else v
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)  # jvp's
        ctx.dtypes = dtype, None if bias is None else bias.dtype

    @staticmethod
    def backward(ctx, grad_out: Tensor, *_: Tensor):
        x, v, g, norm, unscaled, v_low = ctx.saved_tensors
        dtype, bias_dtype = ctx.dtypes
        x_low = x.to(dtype)
        if torch.is_grad_enabled():  # create_graph (gradient penalties): what forward made has no graph
            norm, v_low = torch.linalg.vector_norm(v, dim=1), v.to(dtype)
            unscaled = F.linear(x_low, v_low)
        scale = g.reshape(-1) / norm
        need_x, need_v, need_g, need_bias = ctx.needs_input_grad[:4]
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_unscaled = grad_rows * scale.to(grad_rows.dtype)
        # summed in the norm's precision (float32 under autocast, float64 for float64 layers)
        grad_g = (grad_rows.to(norm.dtype) * unscaled.reshape(grad_rows.shape).to(norm.dtype)).sum(0) / norm
        grad_x = (grad_unscaled @ v_low).reshape(x.shape).to(x.dtype) if need_x else None
        grad_v = None
        if need_v:
            grad_v = (grad_unscaled.T @ x_low.reshape(-1, x.shape[-1])).to(v.dtype)
            # d(g/||v||)/dv = -g * v / ||v||^3, added in place: no second weight-sized tensor
            grad_v.addcmul_(v, (grad_g * scale / norm).unsqueeze(1), value=-1)
        grad_bias = grad_rows.sum(0).to(bias_dtype) if need_bias else None
        return grad_x, grad_v, grad_g.reshape(g.shape) if need_g else None, grad_bias, None

    @staticmethod
    def jvp(ctx, x_dot: Tensor | None, v_dot: Tensor | None, g_dot: Tensor | None, bias_dot: Tensor | None, _: None):
        x, v, g, norm, unscaled, _ = ctx.saved_tensors
        dtype = ctx.dtypes[0]
        scale = g.reshape(-1) / norm
        scale_dot = torch.zeros_like(scale) if g_dot is None else g_dot.reshape(-1) / norm
        out_dot = torch.zeros_like(unscaled)
        if v_dot is not None:
            scale_dot = scale_dot - scale * (v * v_dot).sum(1) / norm.square()
            out_dot = F.linear(x.to(dtype), v_dot.to(dtype))
        if x_dot is not None:
            out_dot = out_dot + F.linear(x_dot.to(dtype), v.to(dtype))
        out_dot = out_dot * scale.to(dtype) + unscaled * scale_dot.to(dtype)
        return (out_dot if bias_dot is None else out_dot + bias_dot.to(dtype)), None, None, None
