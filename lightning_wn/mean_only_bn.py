"""Mean-only batch normalization, the paper's companion to weight norm (Section 3)."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn


class MeanOnlyBatchNorm(nn.Module):
    r"""Subtract the per-channel mean, then add a learned bias: :math:`y = x - \mu + \beta`.

    Weight norm fixes each pre-activation's scale; this removes its shift. Without the division by the batch
    std its noise is milder, which the paper found to regularize well (its best CIFAR-10 result). Inputs are
    ``(N, C, *)``; ``\mu`` is the mean over all axes but 1 in training, a running mean (``momentum``) in eval.

    Example:
        >>> norm = MeanOnlyBatchNorm(3)
        >>> y = norm(torch.randn(8, 3, 5, 5) + 4.0)
        >>> bool(y.mean(dim=(0, 2, 3)).abs().max() < 1e-5)
        True
    """

    def __init__(self, num_features: int, momentum: float = 0.1) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral) or num_features < 1:
            raise ValueError(f"`num_features` must be a positive integer, got {num_features!r}.")
        if isinstance(momentum, Tensor) and momentum.dim() == 0:
            momentum = momentum.item()
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"`momentum` must be a number in [0, 1], got {momentum!r} (BatchNorm's None, a cumulative "
                             "average, is not supported).")
        self.num_features, self.momentum = num_features, float(momentum)
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"MeanOnlyBatchNorm expects input (N, {self.num_features}, ...), got shape "
                             f"{tuple(x.shape)}.")
        mean = self.running_mean
        if self.training:
            if x.numel() == self.num_features:  # (1, C): each mean is the value itself, the output the bias alone
                raise ValueError(f"MeanOnlyBatchNorm needs more than one value per channel in training, got shape "
                                 f"{tuple(x.shape)}: use batches of several examples (`drop_last=True` drops a last "
                                 "batch of one; a data-dependent init's too, whose `init_samples` ranks split).")
            mean = x.mean(dim=[0, *range(2, x.dim())])
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
            self.num_batches_tracked.add_(1)
        return x + (self.bias - mean).to(x.dtype).view(-1, *[1] * (x.dim() - 2))  # (C, 1, ...) broadcasts over N

    def extra_repr(self) -> str:
        return f"{self.num_features}, momentum={self.momentum}"


def attach_mean_only_bn(layer: nn.Module, momentum: float = 0.1) -> MeanOnlyBatchNorm:
    """Put a :class:`MeanOnlyBatchNorm` after ``layer``, in place: the child ``layer.mean_only_bn``, applied by a hook.

    The layer's own names stay; the output units are on axis 1, or a ``Linear``'s last axis (an unbatched
    convolution's first).

    Example:
        >>> layer = nn.Linear(3, 4)
        >>> norm = attach_mean_only_bn(layer)
        >>> bool(layer(torch.randn(16, 3)).mean(0).abs().max() < 1e-6)
        True
    """
    if "mean_only_bn" in layer._modules:
        raise ValueError(f"This {type(layer).__name__} already has a mean-only batch norm attached.")
    if not (units := getattr(layer, "out_features", None) or getattr(layer, "out_channels", None)):
        raise ValueError(f"Cannot attach mean-only batch norm to `{type(layer).__name__}`, which has no `out_features` "
                         "or `out_channels`; supported are Linear, Conv* and ConvTranspose*.")
    layer.mean_only_bn = MeanOnlyBatchNorm(units, momentum)
    layer.register_forward_hook(_apply_mean_only_bn)
    return layer.mean_only_bn


def _apply_mean_only_bn(layer: nn.Module, args: tuple, output: Tensor) -> Tensor:
    # a named function, not a lambda: a model with this hook still pickles
    if isinstance(layer, nn.Linear) and output.dim() > 2:  # (N, ..., features): the units are last, not on axis 1
        return layer.mean_only_bn(output.movedim(-1, 1)).movedim(1, -1)
    if isinstance(layer, nn.modules.conv._ConvNd) and output.dim() == len(layer.kernel_size) + 1:  # unbatched
        return layer.mean_only_bn(output.unsqueeze(0)).squeeze(0)
    return layer.mean_only_bn(output)
