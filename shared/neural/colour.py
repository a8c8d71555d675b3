"""The learned codec's colour path: packed yuv420p frames ↔ float RGB, losslessly.

The models code RGB; the pipeline carries yuv420p.  Going through swscale's
uint8 RGB (interpolated chroma, clipped and rounded RGB, filtered chroma on the
way back) capped quality at 41–46 dB PSNR-RGB on the validation photos before
the model coded a single bit, which held back the codec's top levels.  Here chroma is
replicated 2×2 on the way in and averaged 2×2 on the way out, and the BT.601
limited-range matrix and its inverse run in float with no clipping until the
final uint8: without coding, a frame comes back bit for bit.

Only elementwise tensor operations are used (no BLAS), so a frame converts to
the same bits whatever batch it travels in.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from shared.pixfmt import frame_size, split_planes

# BT.601 (Kr, Kb) in limited range: luma 16..235, chroma 16..240 around 128.
_KR, _KB = 0.299, 0.114
_KG = 1.0 - _KR - _KB
_YS, _CS = 255.0 / 219.0, 255.0 / 224.0
_R_V = _CS * 2 * (1 - _KR)
_G_U = -_CS * 2 * (1 - _KB) * _KB / _KG
_G_V = -_CS * 2 * (1 - _KR) * _KR / _KG
_B_U = _CS * 2 * (1 - _KB)


def yuv420_to_rgb(frames: np.ndarray, width: int, height: int) -> torch.Tensor:
    """(N, frame_size) packed yuv420p uint8 → (N, 3, height, width) float RGB, nominally in [0, 1].

    Saturated chroma can map a little outside [0, 1]; it is kept, not clipped, so that
    :func:`rgb_to_yuv420` can give it back.
    """
    if frames.ndim != 2 or frames.shape[1] != frame_size(width, height):
        raise ValueError(f"expected (N, {frame_size(width, height)}) yuv420p frames of {width}x{height}, got {frames.shape}")
    t = torch.from_numpy(frames.astype(np.float32))  # a copy: pipeline frames are read-only views
    y, u, v = split_planes(t, width, height)
    y = (y - 16.0) * _YS
    u, v = _replicate(u - 128.0, height, width), _replicate(v - 128.0, height, width)
    rgb = torch.stack([y + _R_V * v, y + _G_U * u + _G_V * v, y + _B_U * u], 1)
    return rgb.div_(255.0)


def _replicate(c: torch.Tensor, height: int, width: int) -> torch.Tensor:
    n, ch, cw = c.shape
    return c[:, :, None, :, None].expand(n, ch, 2, cw, 2).reshape(n, 2 * ch, 2 * cw)[:, :height, :width]


def rgb_to_yuv420(rgb: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) float RGB (as :func:`yuv420_to_rgb` gives) → (N, frame_size) packed yuv420p uint8."""
    rgb = rgb.detach().float().cpu() * 255.0
    n, _, h, w = rgb.shape
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    y = _KR * r + _KG * g + _KB * b
    u = (b - y) / (_CS * 2 * (1 - _KB))
    v = (r - y) / (_CS * 2 * (1 - _KR))
    y = y / _YS + 16.0
    # 2x2 means, odd edges replicated: the exact inverse of the replication above.
    uv = F.pad(torch.stack([u, v], 1), (0, w & 1, 0, h & 1), mode="replicate")
    uv = (uv[..., 0::2, 0::2] + uv[..., 1::2, 0::2] + uv[..., 0::2, 1::2] + uv[..., 1::2, 1::2]) * 0.25 + 128.0
    out = torch.cat([y.reshape(n, -1), uv[:, 0].reshape(n, -1), uv[:, 1].reshape(n, -1)], 1)
    return out.round_().clamp_(0, 255).to(torch.uint8).numpy()
