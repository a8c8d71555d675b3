"""The hybrid codec: a native base layer (x264) restored at the receiver by a learned network.

Bitstream::

    blend bytes (one per frame: luma weight << 4 | chroma weight) | base codec's packets

The base layer is an ordinary batch of the native codec, so inter-frame
prediction (motion compensation, skip blocks) carries the temporal redundancy
of the batch: a closed GOP, or, with ``hand_off``, a batch chained to the
previous batch's last frame like a native one (:mod:`shared.codecs.reference`).
A chained stream's reference is always a *base* decode, which the seed is
re-created from: a hand-off hybrid leaves the last frame of every batch
unrestored (blend weights zero), so the frame a receiver keeps is the base's.

The encoder decodes its own base layer, runs the restoration network on each
frame and picks, per frame, how much of its correction to apply (least
squares against the source).  The receiver does the same
arithmetic from the same decoded frames; a frame whose weights are both zero
is the native decode exactly, and the network is not run for it.
Importing this module imports torch.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import numpy as np
import torch

from shared.codecs.base import Codec, CodecError, PayloadHeader, pack_payload, read_header
from shared.codecs.native import LEVEL_CRF, NativeCodec
from shared.modelstore import DEFAULT_MODELS, model_path
from shared.neural.coder import file_sha256
from shared.neural.restoration import (
    ALPHA_MAX, RestorationNet, Restorer, apply_correction, blend_weights, from_planes, to_planes,
)

DEFAULT_MODEL = DEFAULT_MODELS["hybrid"]


class LoadedRestorer:
    """An exported restoration model and what a payload must match to use it."""

    def __init__(self, path: Path, device: str):
        name = path.parent.name
        if not path.exists():
            raise CodecError(f"restoration model {name!r} not found at {path} (set AIC_MODELS_DIR?)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("arch") != "restore":
            raise CodecError(f"model {name!r} is not a restoration model")
        cfg = state["config"]
        net = RestorationNet(int(cfg["channels"]), int(cfg["depth"]), int(cfg["levels"]))
        net.load_state_dict(state["model"])
        self.name, self.base, self.levels = name, str(cfg["base"]), int(cfg["levels"])
        self.sha256 = file_sha256(path)
        self.restorer = Restorer(net, device)
        self.lock = threading.Lock()  # one batch at a time per model (see ImageCoder.lock)


_load_lock = threading.Lock()


@functools.lru_cache(maxsize=8)
def _load(path: str, device: str) -> LoadedRestorer:
    return LoadedRestorer(Path(path), device)


def load_restorer(name: str, device: str | None = None, weights: Path | None = None) -> LoadedRestorer:
    """A cached restorer by model name (or from an explicit weights file)."""
    path = weights or model_path(name)
    with _load_lock:
        return _load(str(path), device or ("cuda" if torch.cuda.is_available() else "cpu"))


class HybridCodec(Codec):
    """x264 carries the batch (one closed GOP); a learned network restores every frame."""

    name = "hybrid"
    version = 1

    def __init__(self, model: str = DEFAULT_MODEL, level: int | None = None, device: str | None = None,
                 preset: str | None = None, threads: int = 0, weights: Path | None = None, reorder: bool = False,
                 hand_off: bool = False):
        self.model = load_restorer(model, device, weights)
        self.base = NativeCodec(self.model.base, preset=preset, threads=threads, reorder=reorder)
        self.levels = min(self.model.levels, len(LEVEL_CRF[self.base.name]))
        self.level = 4 if level is None else self.check_level(level)
        # Chained coding: every batch's last frame is the base decode (see the module's docstring).
        self.hand_off = bool(hand_off) and self.base.chains

    @property
    def chains(self) -> bool:
        """Whether batches may be chained (``reference=``), and their last frame is a reference."""
        return self.hand_off

    @property
    def params(self) -> dict:
        return {"model": self.model.name, "level": self.level, "base": self.base.name}

    def base_crf(self, level: int) -> int:
        return LEVEL_CRF[self.base.name][level]

    def encode(self, frames: np.ndarray, width: int, height: int, fps: float, level: int | None = None,
               *, reference=None, preset: str | None = None) -> bytes:
        return self.encode_reconstruct(frames, width, height, fps, level, reference=reference, preset=preset)[0]

    def encode_reconstruct(
        self, frames: np.ndarray, width: int, height: int, fps: float, level: int | None = None,
        *, reference=None, preset: str | None = None,
    ) -> tuple[bytes, np.ndarray]:
        """As :meth:`Codec.encode_reconstruct`; ``reference`` (a hand-off hybrid only) chains the base
        layer to the previous batch's last frame, ``preset`` sets the base encoder's speed preset."""
        level = self.level if level is None else self.check_level(level)
        if reference is not None and not self.chains:
            raise CodecError("this hybrid codec codes closed GOPs (hand_off=False): it takes no reference")
        base_payload, base_frames = self.base.encode_reconstruct(frames, width, height, fps, level,
                                                                 reference=reference, preset=preset)
        base_header, base_bits = read_header(base_payload)
        decoded = to_planes(base_frames, width, height)
        n = len(frames)
        restore = list(range(n - 1)) if self.hand_off else None  # the hand-off frame stays the base's
        with self.model.lock:
            correction = self.model.restorer.correction(decoded, level, only=restore)
        alphas = blend_weights(correction, decoded, to_planes(frames, width, height))
        if self.hand_off:
            alphas[-1] = (0, 0)
        restored = from_planes(apply_correction(decoded, correction, alphas), width, height)
        header = PayloadHeader(
            self.name, self.version, width, height, n,
            params={"base": self.base.name, "crf": base_header.params["crf"], "level": level,
                    "model": self.model.name, "sha256": self.model.sha256[:16],
                    **{k: base_header.params[k] for k in BASE_PARAMS if k in base_header.params}},
        )
        blend = bytes((ay << 4) | ac for ay, ac in alphas)
        return pack_payload(header, blend + bytes(base_bits)), restored

    def decode_bitstream(self, header: PayloadHeader, bitstream: memoryview, reference=None) -> np.ndarray:
        return decode_hybrid(header, bitstream, reference=reference)


#: The base layer's header parameters a hybrid header carries, so that a receiver can decode a chained
#: base (its preset, reordering and chain block re-create the seed).
BASE_PARAMS = ("preset", "reorder", "chain")


def decode_hybrid(header: PayloadHeader, bitstream: memoryview, device: str | None = None,
                  reference=None) -> np.ndarray:
    """Decode a hybrid payload: the base layer (chained to ``reference`` when its header says so),
    then the restoration its blend bytes ask for."""
    p = header.params
    try:
        base, model, sha, level = str(p["base"]), str(p["model"]), str(p["sha256"]), int(p["level"])
    except (KeyError, TypeError, ValueError):
        raise CodecError("hybrid payload header lacks base, model, sha256 or level") from None
    n = header.frame_count
    if len(bitstream) <= n:
        raise CodecError("hybrid payload is too short for its blend bytes and base layer (truncated?)")
    alphas = [(b >> 4, b & 15) for b in bytes(bitstream[:n])]
    if any(a > ALPHA_MAX for pair in alphas for a in pair):
        raise CodecError("hybrid payload has blend weights out of range (corrupt?)")
    try:
        restorer = load_restorer(model, device)
    except ValueError as exc:  # CodecError included: a bad name or missing weights
        raise CodecError(str(exc)) from None
    if not restorer.sha256.startswith(sha) or restorer.base != base:
        raise CodecError(f"payload was restored with {model} sha256 {sha}…, this receiver has {restorer.sha256[:16]}…")
    if not 0 <= level < restorer.levels:
        raise CodecError(f"hybrid payload level {level} out of range")
    base_header = PayloadHeader(base, 1, header.width, header.height, n, header.pix_fmt,
                                {"crf": p.get("crf"), **{k: p[k] for k in BASE_PARAMS if k in p}})
    decoded_frames = NativeCodec(base).decode_bitstream(base_header, bitstream[n:], reference)
    if not any(a for pair in alphas for a in pair):
        return decoded_frames  # the encoder chose the native decode for every frame
    decoded = to_planes(decoded_frames, header.width, header.height)
    with restorer.lock:
        correction = restorer.restorer.correction(decoded, level, only=[i for i, a in enumerate(alphas) if any(a)])
    return from_planes(apply_correction(decoded, correction, alphas), header.width, header.height)
