"""Training clips for the hybrid codec: synthetic camera motion over still frames, coded by x264.

A clip is ``gop`` crops of one frame taken along a straight path (a pan with a
random speed and direction, up to ``max_speed`` pixels per frame), converted to
yuv420p as the pipeline does and coded as one closed GOP by the same native
codec the compressor uses, at a random rate level.  The network then learns
from (decoded, source) pairs of I- and P-frames at every level.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import torch
from tqdm import tqdm

from shared.codecs.native import NativeCodec
from shared.neural.data import load_frames
from shared.neural.restoration import to_planes
from shared.pixfmt import from_video_frame


class MotionClipSampler:
    """(decoded planes, source planes, level) batches from panned crops of frames held in memory."""

    def __init__(self, files: list[Path], crop: int = 128, gop: int = 8, levels: int = 8, max_speed: float = 6.0,
                 scales: tuple[int, ...] = (640, 1024, 1600), seed: int = 0, base: str = "x264-psnr",
                 max_psnr: float = 46.0):
        if crop % 2:
            raise ValueError("crop must be even")
        self.crop, self.gop, self.levels, self.max_speed, self.max_psnr = crop, gop, levels, max_speed, max_psnr
        span = crop + int(np.ceil(max_speed * (gop - 1)))
        self.frames = [f for path in tqdm(files, desc="loading", unit="file", disable=None)
                       for s in scales for f in load_frames(path, s, max_video_frames=4) if min(f.shape[:2]) >= span]
        if not self.frames:
            raise ValueError(f"no training frame is at least {span}x{span} (crop {crop} plus the pan)")
        # The encoder exactly as the hybrid codec runs it (same slices: see ENCODER_THREADS), so the
        # network learns the artefacts it will see.
        self.codec = NativeCodec(base)
        self.rng = np.random.default_rng(seed)

    def clip(self) -> np.ndarray:
        """(gop, frame_size) yuv420p: a random pan over a random frame."""
        f = self.frames[self.rng.integers(len(self.frames))]
        if self.rng.random() < 0.5:
            f = f[:, ::-1]
        angle = self.rng.uniform(0, 2 * np.pi)
        speed = self.rng.uniform(0, self.max_speed)
        dx, dy = speed * np.cos(angle), speed * np.sin(angle)
        span_x, span_y = abs(dx) * (self.gop - 1), abs(dy) * (self.gop - 1)
        x0 = self.rng.uniform(0, f.shape[1] - self.crop - span_x) + (span_x if dx < 0 else 0)
        y0 = self.rng.uniform(0, f.shape[0] - self.crop - span_y) + (span_y if dy < 0 else 0)
        out = []
        for t in range(self.gop):
            x, y = int(round(x0 + dx * t)), int(round(y0 + dy * t))
            rgb = np.ascontiguousarray(f[y : y + self.crop, x : x + self.crop])
            out.append(from_video_frame(av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")))
        return np.stack(out)

    def batch(self, clips: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(decoded, source, level): planes (clips*gop, 6, crop/2, crop/2) and levels (clips*gop,)."""
        dec, src, lv = [], [], []
        for _ in range(clips):
            for _attempt in range(20):
                frames = self.clip()
                level = int(self.rng.integers(self.levels))
                _, decoded = self.codec.encode_reconstruct(frames, self.crop, self.crop, 25.0, level)
                # Flat crops (sky, gradients: much of a wallpaper) come back near-lossless and teach
                # nothing; keep clips with visible coding error.
                if _psnr(frames, decoded) < self.max_psnr:
                    break
            dec.append(to_planes(decoded, self.crop, self.crop))
            src.append(to_planes(frames, self.crop, self.crop))
            lv += [level] * self.gop
        return torch.cat(dec), torch.cat(src), torch.tensor(lv)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float32) - b) ** 2))
    return 10 * np.log10(255.0**2 / max(mse, 1e-10))
