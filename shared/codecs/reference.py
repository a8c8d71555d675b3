"""The reference hand-off between batches ("chained" coding).

A closed GOP per batch throws away what the previous batch taught the
decoder.  A chained batch keeps it without giving any worker state: the
worker that codes batch k+1 feeds its encoder batch k's last *decoded* frame
first, as a key frame that is **not sent** (the *seed*), then the batch.  The
receiver holds that decoded frame already; it re-creates the same seed packet
by encoding the frame with the same encoder build and settings, feeds it to
its decoder, and decodes the packets that were sent.

What the seed depends on is written into the payload header (:class:`ChainInfo`)
so that any receiver, on any CPU, re-creates it: the encoder's settings, its
thread count, and the instruction-set level its bitstream is pinned to.  The
header also names the reference (the batch it came from, a digest of its
pixels) and a digest of the seed packet, so a receiver that lacks the
reference, holds another one, or re-creates a different seed (another encoder
build) fails with :class:`ReferenceMismatch` instead of drifting.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from shared.codecs.base import CodecError


def frame_digest(frame: np.ndarray) -> str:
    """A short digest of a frame's pixels: what a receiver compares to know it holds the reference."""
    return hashlib.blake2b(np.ascontiguousarray(frame).data, digest_size=DIGEST_BYTES).hexdigest()


def packet_digest(packet: bytes) -> str:
    return hashlib.blake2b(packet, digest_size=DIGEST_BYTES).hexdigest()


#: Digests tell a held reference from another and a re-created seed from a different one: a mismatch
#: detector, not a signature (payload integrity is the bus's business), so 8 bytes do.
DIGEST_BYTES = 8


@dataclass(frozen=True)
class Reference:
    """The picture a chained batch predicts from: the last decoded frame of batch ``batch``."""

    batch: int
    width: int
    height: int
    frame: np.ndarray  # (frame_size,) uint8, packed yuv420p
    # The batch whose real key frame began the chain this frame belongs to (None: unknown).  Workers
    # read it to tell that a receiver's key-frame request was already served by another worker.
    since: int | None = None

    @property
    def digest(self) -> str:
        return frame_digest(self.frame)


class ReferenceMismatch(CodecError):
    """A chained payload whose reference this receiver does not hold (or re-creates differently).

    ``needed`` is the batch the payload predicts from.  The stream decodes again from its next
    real key frame; a receiver asks for one (see :mod:`services.receiver.decode`)."""

    def __init__(self, message: str, needed: int | None = None):
        super().__init__(message)
        self.needed = needed


#: Bounds on what a header may ask a receiver's seed encoder for (a forged header must not make it
#: allocate or spin: one frame is coded with these).
MAX_SEED_THREADS = 16
MAX_LOOKAHEAD = 256


@dataclass(frozen=True)
class ChainInfo:
    """The ``chain`` block of a chained payload's header: what the seed was made from and with."""

    batch: int  # the batch whose last decoded frame is the reference
    frame: str  # frame_digest of the reference
    seed: str  # packet_digest of the seed packet
    threads: int  # 0: the encoder's own choice (codecs whose bitstream does not depend on it)
    isa: str  # instruction-set level the seed's bitstream is pinned to ("sse2" = the portable C output)
    lookahead: int  # frames the encoder looked ahead (0: none); part of the encoder's settings
    gop: int
    fps: str  # "num/den": rate control reads the frame rate

    def to_params(self) -> dict:
        # Short keys and binary digests: the block rides on every chained payload (~60 bytes).
        return {"b": self.batch, "f": bytes.fromhex(self.frame), "s": bytes.fromhex(self.seed), "t": self.threads,
                "i": self.isa, "l": self.lookahead, "g": self.gop, "r": self.fps}

    @classmethod
    def from_params(cls, p) -> "ChainInfo":
        try:
            if not (isinstance(p["f"], bytes) and isinstance(p["s"], bytes)):
                raise TypeError
            info = cls(batch=int(p["b"]), frame=p["f"].hex(), seed=p["s"].hex(), threads=int(p["t"]),
                       isa=str(p["i"]), lookahead=int(p["l"]), gop=int(p["g"]), fps=str(p["r"]))
            num, den = (int(x) for x in info.fps.split("/"))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise CodecError("chained payload header has a malformed chain block") from None
        if not (0 <= info.threads <= MAX_SEED_THREADS and 0 <= info.lookahead <= MAX_LOOKAHEAD
                and 1 <= info.gop <= 100_000 and 1 <= num <= 1_000_000 and 1 <= den <= 1_000_000
                and info.isa in ISA_LEVELS and info.batch >= 0):
            raise CodecError("chained payload header asks for out-of-range encoder settings")
        return info


#: Instruction-set levels a seed may be pinned to, as x264's ``asm`` option names them.  x264's SSE2
#: code gives the same bitstream as its C code (checked in tests), while SSSE3 and later differ, so
#: "sse2" seeds can be re-created on any CPU; "native" means the encoder's own choice (codecs whose
#: bitstream does not depend on it, such as SVT-AV1).
ISA_LEVELS = {"sse2": "MMX2,SSE,SSE2", "c": "0", "native": ""}
