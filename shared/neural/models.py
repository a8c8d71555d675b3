"""Learned image codecs (one short class each).

``MeanScaleHyperprior`` follows Minnen et al. (2018) without the autoregressive
context: a hyperprior predicts a Gaussian mean and scale per latent element.
Rate control is one variable-rate model with per-level channel gains (Cui et
al., 2021, "asymmetric gained"): level ``l`` multiplies the latent by
``gain[l]`` before quantization and by ``inv_gain[l]`` after, so a single set
of weights covers every level.
"""

from __future__ import annotations

import torch
from torch import nn

from shared.neural.entropy import FactorizedDensity, gaussian_likelihood
from shared.neural.layers import SimplifiedGDN, conv, deconv


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


class MeanScaleHyperprior(nn.Module):
    """Analysis/synthesis transforms with GDN, a mean-scale hyperprior and gained rate levels."""

    #: Total downsampling of the hyper-latent: frames are padded to a multiple of this.
    stride = 64

    def __init__(self, n: int = 128, m: int = 192, levels: int = 8):
        super().__init__()
        self.n, self.m, self.levels = n, m, levels
        self.g_a = nn.Sequential(
            conv(3, n), SimplifiedGDN(n), conv(n, n), SimplifiedGDN(n), conv(n, n), SimplifiedGDN(n), conv(n, m)
        )
        self.g_s = nn.Sequential(
            deconv(m, n), SimplifiedGDN(n, inverse=True), deconv(n, n), SimplifiedGDN(n, inverse=True),
            deconv(n, n), SimplifiedGDN(n, inverse=True), deconv(n, 3),
        )
        self.h_a = nn.Sequential(conv(m, n, 3, 1), nn.ReLU(), conv(n, n), nn.ReLU(), conv(n, n))
        # h_s holds only convolutions and ReLUs so that it converts exactly to integer arithmetic.
        self.h_s = nn.Sequential(
            deconv(n, m), nn.ReLU(), deconv(m, m * 3 // 2), nn.ReLU(), conv(m * 3 // 2, 2 * m, 3, 1)
        )
        self.z_density = FactorizedDensity(n)
        init = torch.linspace(-1.5, 1.0, levels).view(levels, 1).expand(levels, m)
        self.log_gain = nn.Parameter(init.clone())
        self.log_inv_gain = nn.Parameter(-init.clone())

    def gains(self, level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gain, inverse gain) for a level index per sample, shaped (N, M, 1, 1)."""
        return (
            self.log_gain[level].exp()[:, :, None, None],
            self.log_inv_gain[level].exp()[:, :, None, None],
        )

    def forward(self, x: torch.Tensor, level: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training pass: x in [0, 1], (N, 3, H, W) with H, W multiples of 64; level (N,) long.

        Rates use additive uniform noise; the synthesis sees rounded latents with a
        straight-through gradient ("mixed" quantization, as in Minnen & Singh 2020).
        """
        gain, inv_gain = self.gains(level)
        y = self.g_a(x) * gain
        z = self.h_a(y)
        z_tilde = z + torch.empty_like(z).uniform_(-0.5, 0.5) if self.training else torch.round(z)
        mean, scale = self.h_s(z_tilde).chunk(2, dim=1)
        y_tilde = y + torch.empty_like(y).uniform_(-0.5, 0.5) if self.training else torch.round(y - mean) + mean
        y_hat = ste_round(y - mean) + mean
        x_hat = self.g_s(y_hat * inv_gain)
        return {
            "x_hat": x_hat,
            "y_likelihood": gaussian_likelihood(y_tilde, mean, scale),
            "z_likelihood": self.z_density.likelihood(z_tilde),
        }
