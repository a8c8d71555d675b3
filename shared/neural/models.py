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


def _float32(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` in float32, also inside an autocast region."""
    with torch.autocast(x.device.type, enabled=False):
        return module(x.float())


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
        # Under a bfloat16 autocast (``aic train --precision bf16``) only the wide convolutions
        # far from the latents run in bfloat16: the layers that make or read the latents, the
        # hyperprior, the noise and the likelihoods stay float32, since bfloat16's 8-bit mantissa
        # would blur latents of magnitude ~30 by a tenth of a quantization step.
        y = _float32(self.g_a[-1], self.g_a[:-1](x)) * gain
        z = _float32(self.h_a, y)
        z_tilde = z + torch.empty_like(z).uniform_(-0.5, 0.5) if self.training else torch.round(z)
        mean, scale = self.entropy_parameters(y, _float32(self.h_s, z_tilde))
        y_tilde = y + torch.empty_like(y).uniform_(-0.5, 0.5) if self.training else torch.round(y - mean) + mean
        y_hat = ste_round(y - mean) + mean
        x_hat = self.g_s[1:](_float32(self.g_s[0], y_hat * inv_gain)).float()
        return {
            "x_hat": x_hat,
            "y_likelihood": gaussian_likelihood(y_tilde, mean, scale),
            "z_likelihood": self.z_density.likelihood(z_tilde),
        }

    def entropy_parameters(self, y: torch.Tensor, hyper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, scale) of every latent element: here the hyperprior's alone."""
        mean, scale = hyper.chunk(2, dim=1)
        return mean, scale


def anchor_mask(h: int, w: int, device=None) -> torch.Tensor:
    """(1, 1, h, w): 1 on the checkerboard's anchors ((i + j) even), 0 on the others."""
    i = torch.arange(h, device=device)[:, None]
    j = torch.arange(w, device=device)[None, :]
    return ((i + j) % 2 == 0).float()[None, None]


class CheckerboardHyperprior(MeanScaleHyperprior):
    """The hyperprior plus a checkerboard spatial context (He et al., 2021).

    The latents split into two interleaved halves.  Anchors ((i + j) even) are coded with the
    hyperprior's parameters alone; every other element then gets a correction of its mean and
    scale computed from the decoded anchors around it.  The context network is linear (depthwise
    5×5, then pointwise M → 2M) so that it converts exactly to integers like ``h_s``, and its
    output is added to the hyperprior's: zero-initialised, the model starts as the hyperprior it
    is fine-tuned from.  Decoding costs one more entropy pass and the context network.
    """

    def __init__(self, n: int = 128, m: int = 192, levels: int = 8):
        super().__init__(n, m, levels)
        self.ctx = nn.Sequential(nn.Conv2d(m, m, 5, padding=2, groups=m), nn.Conv2d(m, 2 * m, 1))
        nn.init.zeros_(self.ctx[1].weight)
        nn.init.zeros_(self.ctx[1].bias)

    def entropy_parameters(self, y: torch.Tensor, hyper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, scale = hyper.chunk(2, dim=1)
        anchor = anchor_mask(*y.shape[-2:], device=y.device)
        # The context sees the anchors as the decoder will have them: rounded around their means.
        anchors = (ste_round(y - mean) + mean) * anchor
        ctx_mean, ctx_scale = _float32(self.ctx, anchors).chunk(2, dim=1)
        other = 1.0 - anchor
        return mean + ctx_mean * other, scale + ctx_scale * other


#: Model classes by the ``arch`` name that checkpoints and weights files record.
ARCHS = {"hyperprior": MeanScaleHyperprior, "checkerboard": CheckerboardHyperprior}
