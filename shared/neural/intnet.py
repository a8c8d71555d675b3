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


class IntegerConvNet:
    """Convolutions (optionally grouped), each followed by a ReLU or not, in exact integer
    arithmetic: weights at 2**WEIGHT_BITS, hidden activations rounded back to 2**ACT_BITS."""

    def __init__(self, layers: list[dict], out_bits: int):
        self.layers = layers
        self.out_bits = out_bits
        self.device = torch.device("cpu")

    def to(self, device: str | torch.device) -> "IntegerConvNet":
        """Run on another device (results stay identical: the arithmetic is exact)."""
        self.device = torch.device(device)
        for layer in self.layers:
            layer["weight"] = layer["weight"].to(self.device)
            layer["bias"] = layer["bias"].to(self.device)
        return self

    @classmethod
    def from_float(cls, seq: nn.Sequential, in_bits: int = 0, in_max: float = 48.0) -> "IntegerConvNet":
        """Quantize a trained float network of convolutions and ReLUs whose input is integer-valued
        at scale ``2**in_bits`` and at most ``in_max`` in magnitude (in those units)."""
        mods = list(seq)
        layers = []
        convs = [m for m in mods if not isinstance(m, nn.ReLU)]
        for i, mod in enumerate(mods):
            if isinstance(mod, nn.ReLU):
                continue
            if not isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
                raise TypeError(f"cannot convert {type(mod).__name__} to integers")
            relu = i + 1 < len(mods) and isinstance(mods[i + 1], nn.ReLU)
            last = mod is convs[-1]
            w = torch.round(mod.weight.detach().double() * 2.0**WEIGHT_BITS)
            b = torch.round(mod.bias.detach().double() * 2.0 ** (in_bits + WEIGHT_BITS))
            transposed = isinstance(mod, nn.ConvTranspose2d)
            # Worst case |sum| per output channel, for the largest admissible input.
            per_out = w.abs().sum(dim=(0, 2, 3)) if transposed else w.abs().sum(dim=(1, 2, 3))
            if float(per_out.max()) * in_max + float(b.abs().max()) >= EXACT_LIMIT:
                raise ValueError("weights too large for exact integer arithmetic")
            layers.append({
                "transposed": transposed, "weight": w, "bias": b, "stride": mod.stride[0],
                "padding": mod.padding[0], "output_padding": mod.output_padding[0] if transposed else 0,
                "groups": mod.groups, "relu": relu,
                "shift": 0 if last else in_bits + WEIGHT_BITS - ACT_BITS,
            })
            in_bits = in_bits + WEIGHT_BITS if last else ACT_BITS
            in_max = ACT_MAX
        if layers[-1]["relu"]:
            raise ValueError("the last layer must be linear")
        return cls(layers, in_bits)

    @torch.no_grad()
    def raw(self, a: torch.Tensor) -> torch.Tensor:
        """Integer-valued float64 input → integer-valued float64 output at ``2**out_bits``, on this
        net's device."""
        with torch.backends.cudnn.flags(enabled=False):
            a = a.detach().to(self.device, torch.float64)
            for layer in self.layers:
                if layer["transposed"]:
                    a = F.conv_transpose2d(a, layer["weight"], layer["bias"], layer["stride"], layer["padding"],
                                           layer["output_padding"], layer["groups"])
                else:
                    a = F.conv2d(a, layer["weight"], layer["bias"], layer["stride"], layer["padding"], 1,
                                 layer["groups"])
                if layer["shift"]:
                    if layer["relu"]:
                        a = a.clamp_min(0)
                    # Round half up: add half a step, then floor (exact for powers of two).
                    step = 2.0 ** layer["shift"]
                    a = torch.floor((a + step / 2) / step).clamp_(-ACT_MAX, ACT_MAX - 1)
            return a


def integer_context(ctx: nn.Sequential) -> IntegerConvNet:
    """A checkerboard context network in integers: its input is the decoded anchors in fixed point at
    ``2**ACT_BITS`` (clamped to ``ACT_MAX``), its output at the hyper-synthesis' own scale."""
    return IntegerConvNet.from_float(ctx, in_bits=ACT_BITS, in_max=ACT_MAX)


class IntegerHyperSynthesis:
    """``h_s`` converted to integers: z (integers) → (mean float32, scale index int64)."""

    def __init__(self, net: IntegerConvNet, thresholds: np.ndarray, m: int):
        self.net = net
        self.m = m
        # Thresholds in the output's integer units, so the comparison is exact too.
        self.thresholds = torch.from_numpy(np.asarray(thresholds, np.float64) * 2.0**net.out_bits)

    @property
    def out_bits(self) -> int:
        return self.net.out_bits

    def to(self, device: str | torch.device) -> "IntegerHyperSynthesis":
        """Run on another device (results stay identical: the arithmetic is exact)."""
        self.net.to(device)
        self.thresholds = self.thresholds.to(device)
        return self

    @classmethod
    def from_float(cls, h_s: nn.Sequential, thresholds: np.ndarray, m: int) -> "IntegerHyperSynthesis":
        """Quantize a trained float ``h_s`` (convolutions separated by ReLUs)."""
        return cls(IntegerConvNet.from_float(h_s), thresholds, m)

    def raw(self, z: torch.Tensor) -> torch.Tensor:
        """z (integers) → the (mean, scale) channels as integers at ``2**out_bits``, on the net's device."""
        return self.net.raw(z)

    @torch.no_grad()
    def params(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw output (as :meth:`raw` gives) → mean float32 and scale index int64, on the CPU."""
        mean = (a[:, : self.m] / 2.0**self.out_bits).float()
        index = torch.searchsorted(self.thresholds, a[:, self.m :].contiguous())
        return mean.cpu(), index.cpu()

    def __call__(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z: (N, C, h, w) integer-valued → mean (N, M, 4h, 4w) float32, scale index int64, on the CPU."""
        return self.params(self.raw(z))
