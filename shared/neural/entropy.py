"""Entropy models: a learned factorized density for the hyper-latent z and a
conditional Gaussian for the latent y, in training (differentiable likelihoods)
and in coding (integer-indexed tables handed to ``constriction``).

Decoding must be bit-exact on any device and batch composition, so nothing the
coder sees is recomputed in floating point on the decoder side: z's tables are
frozen into the model file at export, and y's Gaussian scales come from a fixed
table indexed by integers (see :mod:`shared.neural.intnet`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# The smallest probability the entropy coder gives a symbol (constriction's leaky quantization at
# 24-bit precision).  Likelihoods are floored there too, so the model's rate is the coder's rate
# for tail symbols: with a lower floor (1e-9, as often used) the model charges ~30 bits for a
# symbol the coder codes in 24, and overstates the rate by 2-3 %.
LIKELIHOOD_BOUND = 2.0**-24
SCALE_MIN = 0.11
SCALE_MAX = 64.0
SCALE_LEVELS = 96
# Latent symbols are clamped to [-Y_RANGE, Y_RANGE]; the coder's Gaussian is leaky,
# so every symbol in range is codable, and clamping is the encoder's own choice
# (its reconstruction uses the clamped value), so the decoder stays in step.
Y_RANGE = 255
Z_RANGE = 48


def scale_table() -> np.ndarray:
    """The Gaussian scales the coder may use, log-spaced, float64."""
    return np.exp(np.linspace(math.log(SCALE_MIN), math.log(SCALE_MAX), SCALE_LEVELS))


def scale_thresholds() -> np.ndarray:
    """Geometric midpoints between neighbouring table scales: ``searchsorted`` gives the index."""
    t = scale_table()
    return np.sqrt(t[:-1] * t[1:])


class FactorizedDensity(nn.Module):
    """Ballé et al. (2018)'s non-parametric factorized density, one per channel.

    The cumulative density of each channel is a small monotone network; the
    likelihood of a value is the CDF mass of the unit interval around it.
    """

    def __init__(self, channels: int, filters: tuple[int, ...] = (3, 3, 3), init_scale: float = 10.0):
        super().__init__()
        dims = (1, *filters, 1)
        scale = init_scale ** (1 / (len(filters) + 1))
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(len(filters) + 1):
            init = math.log(math.expm1(1 / scale / dims[i + 1]))
            self.matrices.append(nn.Parameter(torch.full((channels, dims[i + 1], dims[i]), init)))
            self.biases.append(nn.Parameter(torch.rand(channels, dims[i + 1], 1) - 0.5))
            if i < len(filters):
                self.factors.append(nn.Parameter(torch.zeros(channels, dims[i + 1], 1)))

    def logits_cdf(self, v: torch.Tensor) -> torch.Tensor:
        """v: (channels, 1, n) → CDF logits of the same shape."""
        for i, (m, b) in enumerate(zip(self.matrices, self.biases)):
            v = torch.matmul(F.softplus(m), v) + b
            if i < len(self.factors):
                v = v + torch.tanh(self.factors[i]) * torch.tanh(v)
        return v

    def likelihood(self, z: torch.Tensor) -> torch.Tensor:
        """Likelihood of each element of z (N, C, H, W) under its channel's density."""
        n, c, h, w = z.shape
        v = z.permute(1, 0, 2, 3).reshape(c, 1, -1)
        lower = self.logits_cdf(v - 0.5)
        upper = self.logits_cdf(v + 0.5)
        # Subtract in the tail where both sigmoids are smallest, for precision.
        sign = -torch.sign(lower + upper).detach()
        lik = (torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower)).abs()
        return lik.reshape(c, n, h, w).permute(1, 0, 2, 3).clamp_min(LIKELIHOOD_BOUND)

    @torch.no_grad()
    def pmf_table(self) -> np.ndarray:
        """(channels, 2*Z_RANGE+1) float64 probabilities of the integers in [-Z_RANGE, Z_RANGE]."""
        c = self.matrices[0].shape[0]
        v = torch.arange(-Z_RANGE, Z_RANGE + 1, dtype=torch.float32).expand(c, 1, -1)
        lik = self.likelihood(v.reshape(c, 1, 1, -1).permute(1, 0, 2, 3)).permute(1, 0, 2, 3).reshape(c, -1)
        pmf = lik.double().numpy() + 1e-7
        return pmf / pmf.sum(axis=1, keepdims=True)


def gaussian_likelihood(y: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Mass of N(mean, scale) on the unit interval around each value of y."""
    scale = scale.clamp_min(SCALE_MIN)
    v = (y - mean).abs()
    upper = 0.5 * torch.erfc((v - 0.5) / (scale * math.sqrt(2)))
    lower = 0.5 * torch.erfc((v + 0.5) / (scale * math.sqrt(2)))
    return (upper - lower).clamp_min(LIKELIHOOD_BOUND)
