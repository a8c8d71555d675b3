"""Learned restoration of natively decoded video (the hybrid codec's enhancement).

A native codec (x264) carries the frames; at the receiver a small convolutional
network removes its coding artefacts (blocking, ringing, flattened texture).
The network works on the yuv420p planes directly, at chroma resolution: the luma
plane is split into its four 2x2 phases (pixel-unshuffle) and stacked with U and
V, so every convolution runs on a quarter of the pixels and sees luma and chroma
together.  It predicts a correction per sample; the encoder, which holds the
source, chooses per frame how much of that correction to apply (see
:func:`blend_weights`), so the output is never worse than the native decode by
more than the weights' 1/12 quantization step.

Each frame is restored alone, so a batch's pictures do not depend on which
other frames travel with them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from shared.neural.coder import full_precision


#: Blend weights are coded in 1/ALPHA_STEPS steps, 0 .. ALPHA_MAX (per frame, luma and chroma apart):
#: four bits each, one byte per frame.  Up to 1.25: the encoder may push a timid correction further.
ALPHA_STEPS = 12
ALPHA_MAX = 15


class RestorationNet(nn.Module):
    """Residual CNN on (Y phases, U, V) with a learned bias per rate level."""

    def __init__(self, channels: int = 32, depth: int = 6, levels: int = 8):
        super().__init__()
        self.channels, self.depth, self.levels = channels, depth, levels
        self.head = nn.Conv2d(6, channels, 3, padding=1)
        self.level_bias = nn.Parameter(torch.zeros(levels, channels))
        self.body = nn.Sequential(*[
            m for _ in range(depth - 2) for m in (nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU())
        ])
        self.tail = nn.Conv2d(channels, 6, 3, padding=1)
        nn.init.zeros_(self.tail.weight)  # start as the identity: output = the native decode
        nn.init.zeros_(self.tail.bias)

    def forward(self, planes: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """planes (N, 6, h, w) in [0, 1] → correction (N, 6, h, w); level (N,) long."""
        a = F.relu(self.head(planes) + self.level_bias[level][:, :, None, None])
        return self.tail(self.body(a))


def to_planes(frames: np.ndarray, width: int, height: int) -> torch.Tensor:
    """Packed yuv420p (n, frame_size) uint8 → (n, 6, ceil(h/2), ceil(w/2)) float32 in [0, 1].

    Odd sizes: the luma plane is padded by one replicated row/column to twice the chroma size.
    """
    n = frames.shape[0]
    cw, ch = (width + 1) // 2, (height + 1) // 2
    y = frames[:, : width * height].reshape(n, height, width)
    if (2 * cw, 2 * ch) != (width, height):
        y = np.pad(y, ((0, 0), (0, 2 * ch - height), (0, 2 * cw - width)), mode="edge")
    u = frames[:, width * height : width * height + cw * ch].reshape(n, 1, ch, cw)
    v = frames[:, width * height + cw * ch :].reshape(n, 1, ch, cw)
    # Copies: frames may be read-only views of a message's bytes, which torch must not alias.
    yt = F.pixel_unshuffle(torch.from_numpy(y.copy()).unsqueeze(1), 2)
    return torch.cat([yt, torch.from_numpy(u.copy()), torch.from_numpy(v.copy())], dim=1).float().div_(255.0)


def from_planes(planes: torch.Tensor, width: int, height: int) -> np.ndarray:
    """The inverse of :func:`to_planes`, rounding to uint8 (values are clamped to [0, 255])."""
    q = planes.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
    n = q.shape[0]
    y = F.pixel_shuffle(q[:, :4], 2)[:, 0, :height, :width].reshape(n, -1)
    return torch.cat([y, q[:, 4].reshape(n, -1), q[:, 5].reshape(n, -1)], dim=1).numpy()


def blend_weights(correction: torch.Tensor, decoded: torch.Tensor, source: torch.Tensor) -> list[tuple[int, int]]:
    """Per frame, the (luma, chroma) weights in 1/ALPHA_STEPS that bring decoded + a*correction closest to source.

    Least squares per component, rounded to the coded grid and clipped to 0..ALPHA_MAX.
    """
    out = []
    for r, d, s in zip(correction.double(), decoded.double(), source.double()):
        pair = []
        for sl in (slice(0, 4), slice(4, 6)):
            rr, err = r[sl], (s[sl] - d[sl])
            denom = float((rr * rr).sum())
            a = float((rr * err).sum()) / denom if denom > 0 else 0.0
            pair.append(int(min(ALPHA_MAX, max(0, round(a * ALPHA_STEPS)))))
        out.append((pair[0], pair[1]))
    return out


def apply_correction(decoded: torch.Tensor, correction: torch.Tensor, alphas: list[tuple[int, int]]) -> torch.Tensor:
    """decoded + alpha * correction, per frame and component (the same arithmetic at both ends)."""
    a = torch.tensor([[ay] * 4 + [ac] * 2 for ay, ac in alphas], dtype=torch.float32) / ALPHA_STEPS
    return decoded + correction * a[:, :, None, None]


class Restorer:
    """Inference wrapper: frames in, correction out, one frame at a time on a fixed device."""

    def __init__(self, net: RestorationNet, device: str = "cpu"):
        self.net = net.eval().to(device)
        self.device = torch.device(device)
        full_precision(self.device)

    @torch.no_grad()
    def correction(self, planes: torch.Tensor, level: int, only: list[int] | None = None) -> torch.Tensor:
        """The network's correction per frame (zeros for frames not in ``only``, when given)."""
        out = torch.zeros_like(planes)
        lv = torch.tensor([level], device=self.device)
        for i in range(planes.shape[0]) if only is None else only:
            # One frame per call: a frame's result never depends on its batch.
            out[i] = self.net(planes[i : i + 1].to(self.device), lv)[0].float().cpu()
        return out

