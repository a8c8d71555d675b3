"""Building blocks of the transforms."""

from __future__ import annotations

import torch
from torch import nn


class SimplifiedGDN(nn.Module):
    """Simplified generalized divisive normalization (Johnston et al., 2019).

    ``y_i = x_i / (beta_i + sum_j gamma_ij |x_j|)``: as effective as Ballé's GDN
    for compression and cheaper (no square root).  ``inverse=True`` multiplies
    instead, for the synthesis transform.
    """

    def __init__(self, channels: int, inverse: bool = False):
        super().__init__()
        self.inverse = inverse
        self.beta = nn.Parameter(torch.ones(channels))
        self.gamma = nn.Parameter(0.1 * torch.eye(channels).view(channels, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Parameters stay positive by clamping: beta >= 1e-3 keeps the divisor away from zero.
        beta = self.beta.clamp_min(1e-3)
        gamma = self.gamma.clamp_min(0.0)
        norm = nn.functional.conv2d(x.abs(), gamma, beta)
        return x * norm if self.inverse else x / norm


def conv(cin: int, cout: int, kernel: int = 5, stride: int = 2) -> nn.Conv2d:
    """A 'same' convolution that downsamples by ``stride``."""
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2)


def deconv(cin: int, cout: int, kernel: int = 5, stride: int = 2) -> nn.ConvTranspose2d:
    """The transposed convolution that upsamples by ``stride`` exactly."""
    return nn.ConvTranspose2d(
        cin, cout, kernel, stride=stride, padding=kernel // 2, output_padding=stride - 1
    )
