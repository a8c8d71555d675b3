"""The hyper-synthesis in exact integer arithmetic (after Ballé et al., 2019,
"Integer networks for data compression").

The entropy coder's parameters come from the hyper-latent z through ``h_s``.
If encoder and decoder computed ``h_s`` in floating point, a last-bit
difference between devices, libraries or batch sizes could pick a different
Gaussian scale and desynchronize the decoder.  Here every weight, bias and
activation is an integer held in float64: each product and partial sum stays
below 2**53, so every sum is exact whatever the order of summation, and the
result is identical everywhere.  The convolutions must be plain
sums of products (im2col + GEMM): FFT or Winograd algorithms would round.  On
the CPU that is what float64 gets; on a GPU cuDNN is switched off for these
calls so PyTorch's own im2col + cuBLAS path runs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

WEIGHT_BITS = 16  # fixed-point fraction bits of weights
ACT_BITS = 12  # fixed-point fraction bits of hidden activations
ACT_MAX = 2.0**24  # hidden activations are clamped to [0, ACT_MAX) in integer units
EXACT_LIMIT = 2.0**52


class IntegerHyperSynthesis:
    """``h_s`` converted to integers: z (integers) → (mean float32, scale index int64)."""

    def __init__(self, layers: list[dict], thresholds: np.ndarray, m: int):
        self.layers = layers
        self.m = m
        self.thresholds = torch.from_numpy(np.asarray(thresholds, np.float64))
        self.device = torch.device("cpu")

    def to(self, device: str | torch.device) -> "IntegerHyperSynthesis":
        """Run on another device (results stay identical: the arithmetic is exact)."""
        self.device = torch.device(device)
        for layer in self.layers:
            layer["weight"] = layer["weight"].to(self.device)
            layer["bias"] = layer["bias"].to(self.device)
        self.thresholds = self.thresholds.to(self.device)
        return self

    @classmethod
    def from_float(cls, h_s: nn.Sequential, thresholds: np.ndarray, m: int) -> "IntegerHyperSynthesis":
        """Quantize a trained float ``h_s`` (convolutions separated by ReLUs)."""
        mods = list(h_s)
        layers = []
        in_bits = 0  # z is an integer: scale 2**0
        for i, mod in enumerate(mods):
            if isinstance(mod, nn.ReLU):
                continue
            if not isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
                raise TypeError(f"cannot convert {type(mod).__name__} to integers")
            relu = i + 1 < len(mods) and isinstance(mods[i + 1], nn.ReLU)
            w = torch.round(mod.weight.detach().double() * 2.0**WEIGHT_BITS)
            b = torch.round(mod.bias.detach().double() * 2.0 ** (in_bits + WEIGHT_BITS))
            transposed = isinstance(mod, nn.ConvTranspose2d)
            # Worst case |sum| per output channel, for the largest admissible input.
            in_max = 48.0 if in_bits == 0 else ACT_MAX
            per_out = w.abs().sum(dim=(0, 2, 3)) if transposed else w.abs().sum(dim=(1, 2, 3))
            if float(per_out.max()) * in_max + float(b.abs().max()) >= EXACT_LIMIT:
                raise ValueError("hyper-synthesis weights too large for exact integer arithmetic")
            layers.append({
                "transposed": transposed, "weight": w, "bias": b, "stride": mod.stride[0],
                "padding": mod.padding[0], "output_padding": mod.output_padding[0] if transposed else 0,
                "relu": relu, "shift": in_bits + WEIGHT_BITS - ACT_BITS if relu else 0,
            })
            in_bits = ACT_BITS if relu else in_bits + WEIGHT_BITS
        if layers[-1]["relu"]:
            raise ValueError("the last layer of h_s must be linear")
        return cls(layers, thresholds * 2.0**in_bits, m)

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z: (N, C, h, w) integer-valued → mean (N, M, 4h, 4w) float32, scale index int64, on the CPU."""
        with torch.backends.cudnn.flags(enabled=False):
            mean, index = self._run(z.detach().to(self.device, torch.float64))
        return mean.cpu(), index.cpu()

    def _run(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for layer in self.layers:
            if layer["transposed"]:
                a = F.conv_transpose2d(a, layer["weight"], layer["bias"], layer["stride"], layer["padding"],
                                       layer["output_padding"])
            else:
                a = F.conv2d(a, layer["weight"], layer["bias"], layer["stride"], layer["padding"])
            if layer["relu"]:
                # Round half up: add half a step, then floor (exact for powers of two).
                step = 2.0 ** layer["shift"]
                a = torch.floor((a.clamp_min(0) + step / 2) / step).clamp_max_(ACT_MAX - 1)
        out_bits = ACT_BITS + WEIGHT_BITS
        mean = (a[:, : self.m] / 2.0**out_bits).float()
        index = torch.searchsorted(self.thresholds, a[:, self.m :].contiguous())
        return mean, index
