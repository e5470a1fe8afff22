"""Log-likelihoods and KL terms shared by the VAE and DRAW, summed per example, in nats.

Example:
    >>> x = torch.tensor([[0.0, 1.0]])
    >>> bernoulli_log_prob(torch.zeros(1, 2), x)  # two fair coin flips
    tensor([-1.3863])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def bernoulli_log_prob(logits: Tensor, x: Tensor) -> Tensor:
    """log p(x) of binary ``x`` under independent Bernoullis with ``logits``, per example."""
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def discretized_logistic_log_prob(mean: Tensor, log_scale: Tensor, x: Tensor, bins: int = 256) -> Tensor:
    """log P(x) of ``x`` in [0, 1] on a grid of ``bins`` values under a logistic discretized to it.

    Each value owns the interval of width ``1 / (bins - 1)`` around it; the end values own all
    the mass below and above, so the probabilities of the ``bins`` values sum to 1 (as in the
    IAF paper's CIFAR-10 decoder). Per example.

    Example:
        >>> grid = torch.linspace(0, 1, 256, dtype=torch.float64).view(256, 1)  # 256 examples of one pixel
        >>> p = discretized_logistic_log_prob(torch.full_like(grid, 0.3), torch.full_like(grid, -2.0), grid).exp()
        >>> round(p.sum().item(), 6)
        1.0
    """
    half_bin = 0.5 / (bins - 1)
    inv_scale = torch.exp(-log_scale)
    top, bottom = x > 1 - half_bin, x < half_bin
    upper = torch.where(top, torch.inf, (x + half_bin - mean) * inv_scale)
    lower = torch.where(bottom, -torch.inf, (x - half_bin - mean) * inv_scale)
    # log(sigmoid(upper) - sigmoid(lower)), written so that neither tail loses precision
    log_mass = torch.where(
        lower > 0,
        _log_sigmoid_difference(-lower, -upper),  # mass in the upper tail: use the mirror image
        _log_sigmoid_difference(upper, lower),
    )
    # a bin far narrower than the scale: the difference of two close CDFs cancels to nothing in
    # float32, while density times width is accurate to (width / scale)^2
    centre = (x - mean) * inv_scale
    log_density = centre - log_scale - 2 * F.softplus(centre) + math.log(2 * half_bin)
    narrow = ~(top | bottom) & (2 * half_bin * inv_scale < 1e-3)
    return torch.where(narrow, log_density, log_mass).flatten(1).sum(1)


def _log_sigmoid_difference(upper: Tensor, lower: Tensor) -> Tensor:
    """log(sigmoid(upper) - sigmoid(lower)) for upper >= lower, stable where both are small."""
    log_upper = F.logsigmoid(upper)
    return log_upper + torch.log1p(-torch.exp(F.logsigmoid(lower) - log_upper).clamp(max=1 - 1e-12))


def gaussian_kl(mean: Tensor, log_std: Tensor) -> Tensor:
    """KL(N(mean, std^2) || N(0, 1)) per dimension."""
    return 0.5 * (mean.square() + torch.exp(2 * log_std) - 1) - log_std


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, 1), per element."""
    return -0.5 * z.square() - 0.5 * math.log(2 * math.pi)


def bits_per_dim(nats: Tensor, dims: int) -> Tensor:
    """Nats per example to bits per dimension."""
    return nats / (dims * math.log(2))
