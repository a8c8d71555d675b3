"""The learned codec behind the common codec interface.

Frames arrive as yuv420p; the model codes RGB, so each frame goes through the
lossless float colour path of :mod:`shared.neural.colour` (BT.601, limited
range) on the way in and back on the way out.  The
payload names the model and the first 16 hex digits of its weights' sha256: a
receiver decodes only with the same weights, and says so clearly otherwise.
Importing this module imports torch: only the compressor and receivers do.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import numpy as np
import torch

from shared.codecs.base import Codec, CodecError, PayloadHeader, pack_payload
from shared.neural.coder import BitstreamError, ImageCoder
from shared.neural.colour import rgb_to_yuv420, yuv420_to_rgb
from shared.modelstore import DEFAULT_MODELS, model_path

DEFAULT_MODEL = DEFAULT_MODELS["neural"]
DEFAULT_LEVEL = 4
# Decoding work grows with the area a header claims, not with the bytes it sends: a forged
# header must not make a receiver decode gigapixels.  4K (and DCI 4K) fit.
MAX_DECODE_PIXELS = 4096 * 2304


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


_lock = threading.Lock()


@functools.lru_cache(maxsize=8)
def _load(path: str, device: str) -> ImageCoder:
    return ImageCoder(Path(path), device)


def load_coder(name: str, device: str) -> ImageCoder:
    """A cached coder for a model by name (loading takes ~0.1 s; payloads come by the thousand)."""
    path = model_path(name)
    if not path.exists():
        raise CodecError(f"neural model {name!r} not found at {path} (set AIC_MODELS_DIR?)")
    with _lock:
        return _load(str(path), device)


class NeuralCodec(Codec):
    """Intra-frame learned coding: every frame of the batch is coded alone."""

    name = "neural"
    # 2: the float colour path (1 went through swscale's uint8 RGB, which alone capped quality at
    # 41-46 dB PSNR-RGB on the validation photos).
    version = 2

    def __init__(self, model: str = DEFAULT_MODEL, level: int | None = None, device: str | None = None):
        self.device = device or default_device()
        self.coder = load_coder(model, self.device)
        self.model = model
        self.levels = self.coder.levels
        self.level = DEFAULT_LEVEL if level is None else self.check_level(level)

    @property
    def params(self) -> dict:
        return {"model": self.model, "level": self.level}

    def encode(self, frames: np.ndarray, width: int, height: int, fps: float, level: int | None = None) -> bytes:
        return self._encode(frames, width, height, level, reconstruct=False)[0]

    def encode_reconstruct(
        self, frames: np.ndarray, width: int, height: int, fps: float, level: int | None = None
    ) -> tuple[bytes, np.ndarray]:
        payload, recon = self._encode(frames, width, height, level, reconstruct=True)
        return payload, rgb_to_yuv420(recon)

    def _encode(self, frames, width, height, level, reconstruct):
        level = self.level if level is None else self.check_level(level)
        if width * height > MAX_DECODE_PIXELS:
            # No receiver would decode it: refuse here, so the policy sends the batch natively.
            raise CodecError(f"{width}x{height} is above the neural decoder's limit of {MAX_DECODE_PIXELS} pixels")
        x = yuv420_to_rgb(frames, width, height)
        with self.coder.lock:
            streams, recon = self.coder.encode(x, level, reconstruct)
        header = PayloadHeader(
            self.name, self.version, width, height, len(frames),
            params={"model": self.model, "sha256": self.coder.sha256[:16], "level": level,
                    "sizes": [len(s) for s in streams]},
        )
        return pack_payload(header, b"".join(streams)), recon

    def decode_bitstream(self, header: PayloadHeader, bitstream: memoryview) -> np.ndarray:
        return decode_neural(header, bitstream, self.device)


def decode_neural(header: PayloadHeader, bitstream: memoryview, device: str | None = None) -> np.ndarray:
    """Decode a neural payload's bitstream with the model it names."""
    if header.codec_version != NeuralCodec.version:
        raise CodecError(f"neural payload version {header.codec_version} is not decoded here "
                         f"(this receiver decodes version {NeuralCodec.version})")
    p = header.params
    try:
        model, sha, level, sizes = str(p["model"]), str(p["sha256"]), int(p["level"]), [int(s) for s in p["sizes"]]
    except (KeyError, TypeError, ValueError):
        raise CodecError("neural payload header lacks model, sha256, level or sizes") from None
    if header.width * header.height > MAX_DECODE_PIXELS:
        raise CodecError(f"neural payload claims {header.width}x{header.height}, above the decoder's limit")
    if len(sizes) != header.frame_count or any(s <= 0 for s in sizes) or sum(sizes) != len(bitstream):
        raise CodecError("neural payload's frame sizes do not add up to its bitstream (truncated?)")
    if not model or "/" in model or model.startswith("."):
        raise CodecError(f"neural payload names an invalid model {model!r}")
    if len(sha) != 16 or any(c not in "0123456789abcdef" for c in sha):
        raise CodecError("neural payload's model hash is not 16 hex digits")
    try:
        coder = load_coder(model, device or default_device())
    except ValueError as exc:  # a name the model store refuses
        raise CodecError(f"neural payload names an invalid model {model!r}: {exc}") from None
    if not coder.sha256.startswith(sha):
        raise CodecError(f"payload was coded with {model} sha256 {sha}…, this receiver has {coder.sha256[:16]}…")
    streams, pos = [], 0
    for s in sizes:
        streams.append(bytes(bitstream[pos : pos + s]))
        pos += s
    try:
        with coder.lock:
            rgb = coder.decode(streams, level, header.height, header.width)
    except BitstreamError as exc:
        raise CodecError(str(exc)) from None
    return rgb_to_yuv420(rgb)
