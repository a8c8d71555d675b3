"""The codec interface and the self-describing payload container.

Payload layout::

    b"AIC" | version (1 byte) | header length (u32 big-endian) | msgpack header | bitstream

The header names the codec and its version, the frame geometry and the coding
parameters, so ``decode_payload`` needs nothing else.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import msgpack
import numpy as np

from shared.pixfmt import SUPPORTED as PIX_FMTS
from shared.pixfmt import frame_size
from shared.schemas import Limits

MAGIC = b"AIC"
CONTAINER_VERSION = 1
_PREFIX = struct.Struct(">3sBI")
MAX_HEADER = 64 * 1024


class CodecError(ValueError):
    """A payload that cannot be decoded, or frames that cannot be encoded."""


@dataclass(frozen=True)
class PayloadHeader:
    codec: str
    codec_version: int
    width: int
    height: int
    frame_count: int
    pix_fmt: str = "yuv420p"
    params: dict = field(default_factory=dict)


def pack_payload(header: PayloadHeader, bitstream: bytes) -> bytes:
    head = msgpack.packb(
        {
            "codec": header.codec,
            "codec_version": header.codec_version,
            "width": header.width,
            "height": header.height,
            "frame_count": header.frame_count,
            "pix_fmt": header.pix_fmt,
            "params": header.params,
        },
        use_bin_type=True,
    )
    return _PREFIX.pack(MAGIC, CONTAINER_VERSION, len(head)) + head + bitstream


def read_header(payload: bytes) -> tuple[PayloadHeader, memoryview]:
    """Parse and validate the container; returns the header and the bitstream."""
    if len(payload) < _PREFIX.size:
        raise CodecError(f"payload of {len(payload)} bytes is too short for a header")
    magic, version, hlen = _PREFIX.unpack_from(payload)
    if magic != MAGIC:
        raise CodecError("payload does not start with the AIC magic")
    if version != CONTAINER_VERSION:
        raise CodecError(f"container version {version} not supported")
    if hlen > MAX_HEADER or _PREFIX.size + hlen > len(payload):
        raise CodecError("payload header length exceeds the payload (truncated?)")
    try:
        h = msgpack.unpackb(payload[_PREFIX.size : _PREFIX.size + hlen], raw=False)
        header = PayloadHeader(
            codec=str(h["codec"]),
            codec_version=int(h["codec_version"]),
            width=int(h["width"]),
            height=int(h["height"]),
            frame_count=int(h["frame_count"]),
            pix_fmt=str(h["pix_fmt"]),
            params=dict(h["params"]),
        )
    except Exception as exc:
        raise CodecError(f"payload header is malformed ({type(exc).__name__})") from None
    if header.pix_fmt not in PIX_FMTS:
        raise CodecError(f"payload header names unsupported pixel format {header.pix_fmt!r}")
    if not (2 <= header.width <= Limits.max_width and 2 <= header.height <= Limits.max_height
            and 1 <= header.frame_count <= Limits.max_frames):
        raise CodecError(f"payload header has implausible geometry {header.width}x{header.height}x{header.frame_count}")
    # What a decoder would allocate: no more than the largest batch a worker accepts, so a forged
    # header cannot ask any codec for gigabytes.
    decoded = frame_size(header.width, header.height, header.pix_fmt) * header.frame_count
    if decoded > Limits.max_batch_bytes:
        raise CodecError(f"payload header promises {decoded} bytes of frames, over the {Limits.max_batch_bytes} limit")
    return header, memoryview(payload)[_PREFIX.size + hlen :]


class Codec(ABC):
    """Encodes a batch of packed yuv420p frames into one self-contained payload.

    Rate is chosen by ``level``: 0 .. ``levels`` - 1, fewest bits first.  ``None``
    means the codec's configured default.
    """

    name: str
    version: int
    levels: int = 8

    @abstractmethod
    def encode(self, frames: np.ndarray, width: int, height: int, fps: float, level: int | None = None) -> bytes:
        """frames: (n, frame_size) uint8 → payload bytes (one closed GOP)."""

    def encode_reconstruct(
        self, frames: np.ndarray, width: int, height: int, fps: float, level: int | None = None, **options
    ) -> tuple[bytes, np.ndarray]:
        """(payload, the frames a receiver will decode from it).

        The default decodes the payload; codecs that already hold their
        reconstruction (the learned ones) return it without decoding, and tests
        check that it equals a receiver's decode bit for bit.  ``options`` go to
        ``encode`` (native codecs: ``crf``).
        """
        payload = self.encode(frames, width, height, fps, level, **options)
        return payload, decode_payload(payload)[1]

    def check_level(self, level: int) -> int:
        if not 0 <= int(level) < self.levels:
            raise CodecError(f"level {level} out of range 0..{self.levels - 1} for {self.name}")
        return int(level)

    @abstractmethod
    def decode_bitstream(self, header: PayloadHeader, bitstream: memoryview) -> np.ndarray:
        """The inverse of encode's bitstream, given its parsed header."""

    @property
    def params(self) -> dict:
        return {}


def decode_payload(payload: bytes, reference=None) -> tuple[PayloadHeader, np.ndarray]:
    """Decode any aic payload to (header, frames (n, frame_size) uint8).

    A chained payload (its header has a ``chain`` block) needs the
    :class:`~shared.codecs.reference.Reference` it predicts from; without it, or with another one,
    :class:`~shared.codecs.reference.ReferenceMismatch` (a CodecError) is raised.
    """
    from shared.codecs import bitstream_decoder  # the registry imports this module

    header, bitstream = read_header(payload)
    try:
        decode = bitstream_decoder(header.codec)
    except ValueError as exc:
        raise CodecError(str(exc)) from None
    if "chain" in header.params:
        from shared.codecs.native import CHAINABLE

        # A forged header: only these codecs' seeds are re-created (a hybrid's base layer is one of them).
        chained = header.params.get("base") if header.codec == "hybrid" else header.codec
        if chained not in CHAINABLE:
            raise CodecError(f"a {header.codec} payload cannot be chained (chainable: {', '.join(CHAINABLE)}, "
                             "and hybrid on one of them)")
        frames = decode(header, bitstream, reference=reference)
    else:
        frames = decode(header, bitstream)
    expected = (header.frame_count, frame_size(header.width, header.height, header.pix_fmt))
    if frames.shape != expected:
        raise CodecError(f"decoded {frames.shape}, header promised {expected}")
    return header, frames
