"""``aic decode``: follow a stream's compressed batches and write the decoded video.

Batches may complete out of order (several workers); they are written in
``batch_seq`` order.  Output by extension: ``.y4m`` (raw yuv420p) or ``.mkv``
(lossless FFV1) for exact comparisons, ``.mp4`` (x264, CRF 16) for viewing.
A file holds one frame size: when the source changes resolution (the gateway
starts a new batch there), the frames that follow go to ``NAME.1.EXT``,
``NAME.2.EXT`` and so on.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from nats.js import api as jsapi

from shared import bus as busmod
from shared.bus import Bus, ClaimError
from shared.codecs import CodecError, decode_payload
from shared.logs import get_logger
from shared.pixfmt import to_video_frame
from shared.schemas import SchemaError, unpack_compressed_batch

log = get_logger("receiver")

#: Batches held back waiting for a missing one before it is given up as a gap (bounds memory: at
#: 720p a batch of 8 decoded frames is 11 MB).
REORDER_WINDOW = 16
_OUTPUTS = {".y4m": ("rawvideo", {}), ".mkv": ("ffv1", {}), ".mp4": ("libx264", {"crf": "16", "preset": "fast"})}


class VideoWriter:
    """Packed yuv420p frames → video files chosen by extension, a new file at each change of size."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        ext = self.path.suffix.lower()
        if ext not in _OUTPUTS:
            raise ValueError(f"unsupported output {ext!r}; use one of {sorted(_OUTPUTS)}")
        self.codec, self.options = _OUTPUTS[ext]
        self.container = None
        self.stream = None
        self.size: tuple[int, int] | None = None
        self.frames = 0  # in the current file
        self.files: list[Path] = []

    def write(self, frames: np.ndarray, width: int, height: int, fps: Fraction) -> None:
        if self.container is not None and self.size != (width, height):
            self._finish()
        if self.container is None:
            path = self.path if not self.files else self.path.with_suffix(f".{len(self.files)}{self.path.suffix}")
            self.container = av.open(str(path), "w")
            self.stream = self.container.add_stream(self.codec, rate=fps, options=self.options)
            self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
            self.size, self.frames = (width, height), 0
            self.files.append(path)
        for f in frames:
            vf = to_video_frame(f, width, height)
            vf.pts = self.frames
            for pkt in self.stream.encode(vf):
                self.container.mux(pkt)
            self.frames += 1

    def _finish(self) -> None:
        for pkt in self.stream.encode(None):
            self.container.mux(pkt)
        self.container.close()
        self.container = self.stream = None

    def close(self) -> None:
        if self.container is not None:
            self._finish()


@dataclass
class DecodeStats:
    stream_id: str
    batches: int = 0
    frames: int = 0
    compressed_bytes: int = 0
    errors: int = 0
    gaps: list[int] = field(default_factory=list)
    held_max: int = 0  # most batches held back at once waiting for a missing one (memory)
    files: list[Path] = field(default_factory=list)  # more than one when the frame size changed


async def decode_stream(
    bus: Bus,
    stream_id: str,
    out: str | Path,
    idle_timeout: float = 3.0,
    expect_batches: int | None = None,
    stop: asyncio.Event | None = None,
    start_seq: int | None = None,
) -> DecodeStats:
    """Decode every compressed batch of a stream, from ``start_seq`` (default: the lowest batch the
    bus still holds), until ``expect_batches`` arrived or nothing new came for ``idle_timeout`` seconds."""
    stats = DecodeStats(stream_id)
    writer = VideoWriter(out)
    sub = await bus.js.subscribe(
        busmod.compressed_subject(stream_id),
        ordered_consumer=True,
        config=jsapi.ConsumerConfig(deliver_policy=jsapi.DeliverPolicy.ALL),
    )
    pending: dict[int, tuple] = {}
    next_seq = start_seq
    loop = asyncio.get_running_loop()
    try:
        while stop is None or not stop.is_set():
            if expect_batches is not None and stats.batches >= expect_batches:
                break
            try:
                msg = await sub.next_msg(timeout=idle_timeout)
            except (asyncio.TimeoutError, TimeoutError):
                break
            except Exception as exc:  # nats-py raises its own TimeoutError subclass
                if "Timeout" in type(exc).__name__:
                    break
                raise
            try:
                cb = unpack_compressed_batch(await bus.payload(msg))
                header, frames = await loop.run_in_executor(None, decode_payload, cb.payload)
                if (header.width, header.height, header.frame_count) != (cb.width, cb.height, cb.frame_count):
                    raise CodecError(f"payload is {header.width}x{header.height}x{header.frame_count}, "
                                     f"the batch says {cb.width}x{cb.height}x{cb.frame_count}")
            except (SchemaError, CodecError, ClaimError) as exc:
                stats.errors += 1
                log.error("undecodable_batch", subject=msg.subject, error=str(exc))
                continue
            if cb.batch_seq in pending or (next_seq is not None and cb.batch_seq < next_seq):
                continue  # duplicate delivery
            pending[cb.batch_seq] = (cb, frames)
            stats.held_max = max(stats.held_max, len(pending))
            stats.batches += 1
            stats.compressed_bytes += len(cb.payload)
            if next_seq is None and (len(pending) > REORDER_WINDOW or msg.metadata.num_pending == 0):
                # Batches are stored as workers finish them, a little out of order: the stream's first
                # is the lowest of what arrived by the time it was read to its end (or a window's worth).
                next_seq = min(pending)
            if next_seq is None:
                continue
            if len(pending) > REORDER_WINDOW and next_seq not in pending:
                # The missing batch is not coming (rejected, failed, or lost upstream): skip it
                # rather than hold every later batch's frames in memory.
                skip_to = min(pending)
                stats.gaps.extend(range(next_seq, skip_to))
                log.warning("batches_missing", stream_id=stream_id, first=next_seq, last=skip_to - 1)
                next_seq = skip_to
            while next_seq in pending:
                c, f = pending.pop(next_seq)
                writer.write(f, c.width, c.height, Fraction(c.fps_num, c.fps_den))
                stats.frames += c.frame_count
                next_seq += 1
        # Whatever is left arrived after a gap: write it in order, and say so.
        if next_seq is None and pending:
            next_seq = min(pending)
        for seq in sorted(pending):
            stats.gaps.extend(range(next_seq, seq))
            c, f = pending[seq]
            writer.write(f, c.width, c.height, Fraction(c.fps_num, c.fps_den))
            stats.frames += c.frame_count
            next_seq = seq + 1
    finally:
        await sub.unsubscribe()
        writer.close()
        stats.files = writer.files
    log.info(
        "decode_done", stream_id=stream_id, batches=stats.batches, frames=stats.frames, gaps=len(stats.gaps), out=str(out)
    )
    return stats
