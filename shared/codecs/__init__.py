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
    "LEARNED_CODECS",
    "learned_available",
    "neural_available",
    "create_codec",
    "decode_payload",
    "read_header",
]


#: Codecs with a learned model; the compressor's policy checks them against a native one.
LEARNED_CODECS = ("neural", "hybrid")
CODEC_NAMES = (*NATIVE_CODECS, *LEARNED_CODECS)


def _learned_module(name: str):
    # Learned codecs are imported only when asked for: they bring torch.
    try:
        if name == "neural":
            from shared.codecs import neural as module
        else:
            from shared.codecs import hybrid as module
    except ImportError as exc:
        raise CodecError(f"the {name} codec needs torch and constriction: pip install 'aic[neural]' ({exc})") from None
    return module


def create_codec(name: str, **params) -> Codec:
    """A codec by its id (``x264``, ``x265``, ``vp9``, ``av1``, ``neural``, ``hybrid``)."""
    if name in NATIVE_CODECS:
        return NativeCodec(name, **params)
    if name == "neural":
        return _learned_module(name).NeuralCodec(**params)
    if name == "hybrid":
        return _learned_module(name).HybridCodec(**params)
    raise ValueError(f"unknown codec {name!r}; available: {list(CODEC_NAMES)}")


def bitstream_decoder(name: str):
    """The function ``(header, bitstream) -> frames`` for a payload's codec id."""
    if name in NATIVE_CODECS:
        return NativeCodec(name).decode_bitstream
    if name == "neural":
        return _learned_module(name).decode_neural
    if name == "hybrid":
        return _learned_module(name).decode_hybrid
    raise ValueError(f"payload names unknown codec {name!r}")


def learned_available(name: str) -> bool:
    """True when torch and constriction import and the codec's default weights are present."""
    from shared.modelstore import DEFAULT_MODELS, model_path

    if not model_path(DEFAULT_MODELS[name]).exists():
        return False
    try:
        _learned_module(name)
    except CodecError:
        return False
    return True


def neural_available() -> bool:
    """True when the intra-frame neural codec can run with its default weights."""
    return learned_available("neural")
