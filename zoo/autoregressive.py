"""Inverse autoregressive flow (Kingma et al., 2016) on a latent feature map: the VAE's IAF posterior.

The latent elements are ordered pixel by pixel (raster scan), and within a pixel channel by
channel. A masked convolution lets each output see only the inputs before it in that order (and,
unless ``strict``, the ones at its own place), so a hidden masked layer followed by strict ones is
autoregressive: the flow's Jacobian is triangular and its log-determinant is a sum.

Example:
    >>> flow = InverseAutoregressiveFlow(latent_channels=4, hidden_channels=8)
    >>> z, context = torch.randn(1, 4, 5, 5), torch.randn(1, 8, 5, 5)
    >>> moved = z.clone()
    >>> moved[0, 3, 4, 4] += 1.0  # the last element in the order: no other output depends on it
    >>> (flow(z, context)[0] != flow(moved, context)[0]).nonzero().tolist()
    [[0, 3, 4, 4]]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def channel_degrees(channels: int, latent_channels: int) -> Tensor:
    """The latent channel each of ``channels`` units stands for: unit ``i`` follows ``i * latent // channels``."""
    return torch.arange(channels) * latent_channels // channels


def autoregressive_mask(out_channels: int, in_channels: int, latent_channels: int, kernel_size: int, strict: bool
                        ) -> Tensor:  # fmt: skip
    """A (out, in, k, k) 0/1 kernel mask: every tap of the rows above the centre and of the centre row's left half;
    at the centre, the inputs whose latent channel comes before the output's (``strict``) or is at most it."""
    mask = torch.zeros(out_channels, in_channels, kernel_size, kernel_size)
    centre = kernel_size // 2
    mask[:, :, :centre] = 1
    mask[:, :, centre, :centre] = 1
    degree_out = channel_degrees(out_channels, latent_channels)[:, None]
    degree_in = channel_degrees(in_channels, latent_channels)[None, :]
    mask[:, :, centre, centre] = (degree_in < degree_out if strict else degree_in <= degree_out).float()
    return mask


class AutoregressiveConv2d(nn.Conv2d):
    """A same-size conv whose kernel is multiplied by :func:`autoregressive_mask` in every forward.

    The mask is applied to the weight the layer computes with, so weight norm (which replaces
    ``weight`` by ``g * v / ||v||``) keeps the layer autoregressive. ``||v||`` then includes the
    masked taps, where the authors' code leaves them out: that scales each unit's effective ``g``
    by ``||v unmasked|| / ||v||`` and leaves its direction as theirs.

    Example:
        >>> conv = AutoregressiveConv2d(2, 2, latent_channels=2, strict=True)
        >>> conv.mask[:, :, 1, 1]  # at the centre, channel 1 sees channel 0, channel 0 sees nothing
        tensor([[0., 0.],
                [1., 0.]])
    """

    def __init__(self, in_channels: int, out_channels: int, latent_channels: int, kernel_size: int = 3,
                 *, strict: bool) -> None:  # fmt: skip
        if kernel_size % 2 == 0:
            raise ValueError(f"`kernel_size` must be odd (the centre tap is the element itself), got {kernel_size}.")
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        mask = autoregressive_mask(out_channels, in_channels, latent_channels, kernel_size, strict)
        self.register_buffer("mask", mask, persistent=False)  # a function of the shape: not state
        self.strict = strict

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, strict={self.strict}"


class InverseAutoregressiveFlow(nn.Module):
    r"""One IAF step, :math:`z \leftarrow (z - m) / e^{s}`, with :math:`m, s` autoregressive in ``z``.

    As the authors' bottom-up IAF posterior (openai/iaf ``models.py``, ``up_iaf2_nl`` with
    ``depth_ar`` 1): a masked conv of ``z`` plus the encoder's context, ELU, then two strict
    masked convs for :math:`m` and :math:`s`, each scaled by ``output_scale`` (their 0.1), so a
    fresh step is close to the identity. Since :math:`\partial z'_i / \partial z_i = e^{-s_i}` on a
    triangular Jacobian, :math:`\log q(z') = \log q(z) + \sum_i s_i`.

    Args:
        latent_channels: channels of ``z``.
        hidden_channels: width of the hidden masked layer; the context must have as many channels.
        output_scale: the factor on :math:`m` and :math:`s`.
    """

    def __init__(self, latent_channels: int, hidden_channels: int, output_scale: float = 0.1) -> None:
        super().__init__()
        self.hidden = AutoregressiveConv2d(latent_channels, hidden_channels, latent_channels, strict=False)
        self.shift = AutoregressiveConv2d(hidden_channels, latent_channels, latent_channels, strict=True)
        self.log_scale = AutoregressiveConv2d(hidden_channels, latent_channels, latent_channels, strict=True)
        self.output_scale = output_scale

    def forward(self, z: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """The new ``z`` and ``s``, per element: what the step adds to log q."""
        h = F.elu(self.hidden(z) + context)
        shift, log_scale = self.output_scale * self.shift(h), self.output_scale * self.log_scale(h)
        return (z - shift) * torch.exp(-log_scale), log_scale

    def extra_repr(self) -> str:
        return f"output_scale={self.output_scale}"
