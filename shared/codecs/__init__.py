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
    "CODEC_NAMES",
    "neural_available",
    "create_codec",
    "decode_payload",
    "read_header",
]


CODEC_NAMES = (*NATIVE_CODECS, "neural")


def create_codec(name: str, **params) -> Codec:
    """A codec by its id (``x264``, ``x265``, ``vp9``, ``av1``, ``neural``).

    The neural codec is imported only when asked for: it brings torch.
    """
    if name in NATIVE_CODECS:
        return NativeCodec(name, **params)
    if name == "neural":
        try:
            from shared.codecs.neural import NeuralCodec
        except ImportError as exc:
            raise CodecError(f"the neural codec needs torch and constriction: pip install 'aic[neural]' ({exc})") from None
        return NeuralCodec(**params)
    raise ValueError(f"unknown codec {name!r}; available: {list(CODEC_NAMES)}")


def bitstream_decoder(name: str):
    """The function ``(header, bitstream) -> frames`` for a payload's codec id."""
    if name in NATIVE_CODECS:
        return NativeCodec(name).decode_bitstream
    if name == "neural":
        try:
            from shared.codecs.neural import decode_neural
        except ImportError as exc:
            raise CodecError(f"this payload needs the neural codec: pip install 'aic[neural]' ({exc})") from None
        return decode_neural
    raise ValueError(f"payload names unknown codec {name!r}")


def neural_available() -> bool:
    """True when torch and constriction import and the default model's weights are present."""
    try:
        from shared.codecs.neural import DEFAULT_MODEL, model_path
    except ImportError:
        return False
    return model_path(DEFAULT_MODEL).exists()
