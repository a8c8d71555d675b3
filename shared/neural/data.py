"""Training data: photographs and video frames held in memory, served as random crops."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import torch
from tqdm import tqdm

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".mkv", ".mov", ".webm", ".avi", ".y4m", ".ts"}


def list_sources(spec: str | Path) -> list[Path]:
    """Files named by a list file (one path per line), a folder (searched recursively) or one file.

    A list file may also name synthetic FFmpeg sources as ``lavfi:<graph>`` lines (read as videos).
    """
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
    elif p.suffix.lower() == ".txt":
        lines = [line.strip() for line in p.read_text().splitlines() if line.strip() and not line.startswith("#")]
        files = [LavfiSource(line) if line.startswith("lavfi:") else Path(line) for line in lines]
    elif p.exists():
        files = [p]
    else:
        raise FileNotFoundError(f"training data {spec!r}: no such file or folder")
    missing = [f for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} listed files do not exist, e.g. {missing[0]}")
    if not files:
        raise ValueError(f"no images or videos found in {spec!r}")
    return files


class LavfiSource(str):
    """A synthetic source named ``lavfi:<graph>`` in a data list; ``exists`` like a Path."""

    suffix = ".lavfi"

    def exists(self) -> bool:
        return True


def _resize(frame: av.VideoFrame, max_side: int) -> np.ndarray:
    scale = min(1.0, max_side / max(frame.width, frame.height))
    w = max(2, int(round(frame.width * scale)) // 2 * 2)
    h = max(2, int(round(frame.height * scale)) // 2 * 2)
    # Downscaling (area filter) also removes the source's own compression noise.
    return frame.to_ndarray(width=w, height=h, format="rgb24", interpolation="AREA")


def load_frames(path: Path, max_side: int, video_stride: int = 15, max_video_frames: int = 40) -> list[np.ndarray]:
    """RGB frames (H, W, 3) uint8 of an image, or every ``video_stride``-th frame of a video."""
    out: list[np.ndarray] = []
    lavfi = isinstance(path, LavfiSource)
    with (av.open(path[len("lavfi:"):], format="lavfi") if lavfi else av.open(str(path))) as container:
        stream = container.streams.video[0]
        is_video = lavfi or path.suffix.lower() in VIDEO_SUFFIXES
        for i, frame in enumerate(container.decode(stream)):
            if not is_video:
                return [_resize(frame, max_side)]
            if i % video_stride == 0:
                out.append(_resize(frame, max_side))
                if len(out) >= max_video_frames:
                    break
    return out


class CropSampler:
    """Random crops with random flips from frames held in memory, at several scales."""

    def __init__(self, files: list[Path], crop: int, scales: tuple[int, ...] = (768, 1280, 2048), seed: int = 0):
        self.crop = crop
        self.frames = [f for path in tqdm(files, desc="loading", unit="file", disable=None)
                       for s in scales for f in load_frames(path, s) if min(f.shape[:2]) >= crop]
        if not self.frames:
            raise ValueError(f"no training frame is at least {crop}x{crop}")
        self.rng = np.random.default_rng(seed)

    def batch(self, n: int) -> torch.Tensor:
        """(n, 3, crop, crop) float32 in [0, 1]."""
        out = np.empty((n, self.crop, self.crop, 3), np.uint8)
        for k in range(n):
            f = self.frames[self.rng.integers(len(self.frames))]
            y = self.rng.integers(f.shape[0] - self.crop + 1)
            x = self.rng.integers(f.shape[1] - self.crop + 1)
            c = f[y : y + self.crop, x : x + self.crop]
            if self.rng.random() < 0.5:
                c = c[:, ::-1]
            if self.rng.random() < 0.5:
                c = c[::-1]
            out[k] = c
        return torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255.0)
