"""The receiver side: compressed batches of a stream → decoded video."""

from services.receiver.decode import DecodeStats, VideoWriter, decode_stream

__all__ = ["DecodeStats", "VideoWriter", "decode_stream"]
