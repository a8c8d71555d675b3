"""Codecs behind one interface: ``encode(frames) -> payload``, ``decode(payload) -> frames``.

Payloads are self-describing (see :mod:`shared.codecs.base`), so a receiver needs
nothing but the payload to pick the codec and decode it.
"""

from shared.codecs.base import Codec, CodecError, PayloadHeader, decode_payload, read_header
from shared.codecs.native import NATIVE_CODECS, NativeCodec

__all__ = [
    "Codec",
    "CodecError",
    "PayloadHeader",
    "NATIVE_CODECS",
    "NativeCodec",
    "create_codec",
    "decode_payload",
    "read_header",
]


def create_codec(name: str, **params) -> Codec:
    """A codec by its id (``x264``, ``x265``, ``vp9``, ``av1``)."""
    if name in NATIVE_CODECS:
        return NativeCodec(name, **params)
    raise ValueError(f"unknown codec {name!r}; available: {sorted(NATIVE_CODECS)}")
