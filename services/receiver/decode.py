"""``aic decode``: follow a stream's compressed batches and write the decoded video.

Batches may complete out of order (several workers); they are written in
``batch_seq`` order, and decoded in that order: a chained batch predicts from
the previous batch's last decoded frame, which the receiver keeps.  Output by extension: ``.y4m`` (raw yuv420p) or ``.mkv``
(lossless FFV1) for exact comparisons, ``.mp4`` (x264, CRF 16) for viewing.
A file holds one frame size: when the source changes resolution (the gateway
starts a new batch there), the frames that follow go to ``NAME.1.EXT``,
``NAME.2.EXT`` and so on.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from shared import bus as busmod
from shared.bus import Bus, ClaimError
from shared.codecs import CodecError, decode_payload
from shared.codecs.reference import Reference, ReferenceMismatch
from shared.control import keyframe_subject
from shared.logs import get_logger
from shared.pixfmt import to_video_frame
from shared.schemas import SchemaError, unpack_compressed_batch

log = get_logger("receiver")

#: Batches held back waiting for a missing one before it is given up as a gap (bounds memory: at
#: 720p a batch of 8 decoded frames is 11 MB).
REORDER_WINDOW = 16
_OUTPUTS = {".y4m": ("rawvideo", {}), ".mkv": ("ffv1", {}), ".mp4": ("libx264", {"crf": "16", "preset": "fast"})}


class InOrder:
    """A stream's batches handed on in ``batch_seq`` order: one that arrives early waits for those
    before it, until ``window`` are waiting, when the missing ones are given up as a gap (they were
    rejected, failed, or lost upstream; holding every later batch would not bring them)."""

    def __init__(self, stream_id: str, window: int, next_seq: int | None = None, gaps: list[int] | None = None):
        self.stream_id, self.window, self.next_seq = stream_id, window, next_seq
        self.gaps = [] if gaps is None else gaps  # the numbers given up
        self.held_max = 0  # most batches held at once (memory: at 720p, 11 MB a decoded batch of 8)
        self._pending: dict[int, object] = {}

    def add(self, cb, start: bool = True) -> list | None:
        """The batches ``cb`` lets go, in order (None: ``cb`` is a repeat).  While the first number
        is unknown, ``start`` says to begin at the lowest held now (else: once a window is held)."""
        seq = cb.batch_seq
        if seq in self._pending or (self.next_seq is not None and seq < self.next_seq):
            return None
        self._pending[seq] = cb
        self.held_max = max(self.held_max, len(self._pending))
        if self.next_seq is None:
            if not start and len(self._pending) <= self.window:
                return []
            self.next_seq = min(self._pending)
        if len(self._pending) > self.window and self.next_seq not in self._pending:
            skip_to = min(self._pending)
            self.gaps.extend(range(self.next_seq, skip_to))
            log.warning("batches_missing", stream_id=self.stream_id, first=self.next_seq, last=skip_to - 1)
            self.next_seq = skip_to
        out = []
        while self.next_seq in self._pending:
            out.append(self._pending.pop(self.next_seq))
            self.next_seq += 1
        return out

    def rest(self) -> list:
        """What is still held, in order, the numbers missing between counted as gaps."""
        out = []
        for seq in sorted(self._pending):
            if self.next_seq is None:
                self.next_seq = seq
            self.gaps.extend(range(self.next_seq, seq))
            out.append(self._pending.pop(seq))
            self.next_seq = seq + 1
        return out


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
    batches: int = 0  # decoded and written
    frames: int = 0
    compressed_bytes: int = 0
    errors: int = 0
    gaps: list[int] = field(default_factory=list)
    held_max: int = 0  # most batches held back at once waiting for a missing one (memory)
    files: list[Path] = field(default_factory=list)  # more than one when the frame size changed
    undecodable: list[int] = field(default_factory=list)  # batches that arrived but could not be decoded
    keyframe_requests: int = 0  # times this receiver asked for a key frame (it lacked a reference)


class Receiver:
    """A stream's decoder state: the last decoded frame (the reference chained batches predict
    from), and the key-frame requests made when a batch needs a reference this receiver lacks."""

    def __init__(self, bus: Bus, stream_id: str, stats: DecodeStats):
        self.bus, self.stream_id, self.stats = bus, stream_id, stats
        self.reference: Reference | None = None

    async def decode(self, cb) -> np.ndarray | None:
        """The batch's frames, or None when it cannot be decoded (logged, counted; a chained batch
        whose reference is missing also asks the workers for a key frame)."""
        loop = asyncio.get_running_loop()
        try:
            header, frames = await loop.run_in_executor(None, decode_payload, cb.payload, self.reference)
            if (header.width, header.height, header.frame_count) != (cb.width, cb.height, cb.frame_count):
                raise CodecError(f"payload is {header.width}x{header.height}x{header.frame_count}, "
                                 f"the batch says {cb.width}x{cb.height}x{cb.frame_count}")
        except ReferenceMismatch as exc:
            self._failed(cb)
            log.error("reference_missing", stream_id=self.stream_id, batch_seq=cb.batch_seq, needs=exc.needed,
                      error=str(exc))
            await self.request_keyframe(cb.batch_seq + 1)
            return None
        except CodecError as exc:
            self._failed(cb)
            log.error("undecodable_batch", stream_id=self.stream_id, batch_seq=cb.batch_seq, error=str(exc))
            return None
        self.reference = Reference(cb.batch_seq, cb.width, cb.height, frames[-1])
        return frames

    def _failed(self, cb) -> None:
        self.stats.errors += 1
        self.stats.undecodable.append(cb.batch_seq)
        # The next chained batch predicts from this one: without it, only a key frame decodes again.
        self.reference = None

    async def request_keyframe(self, from_batch: int) -> None:
        """Ask the workers to start the stream again with a real key frame (batch ``from_batch`` or later)."""
        self.stats.keyframe_requests += 1
        try:
            await self.bus.nc.publish(keyframe_subject(self.stream_id), json.dumps({"from_batch": from_batch}).encode())
        except Exception as exc:  # the next failing batch asks again
            log.warning("keyframe_request_failed", stream_id=self.stream_id, error=f"{type(exc).__name__}: {exc}")
            return
        log.info("keyframe_request", stream_id=self.stream_id, from_batch=from_batch)


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
    bus still holds), until ``expect_batches`` arrived or nothing new came for ``idle_timeout`` seconds.

    Batches are decoded in ``batch_seq`` order: a chained batch predicts from the previous batch's
    last decoded frame, which this receiver holds.  One it cannot decode (it joined mid-stream, missed
    a batch, or has another encoder build) is reported and counted in ``undecodable``, a key frame is
    requested, and decoding resumes at the stream's next real key frame."""
    stats = DecodeStats(stream_id)
    writer = VideoWriter(out)
    receiver = Receiver(bus, stream_id, stats)
    sub = await bus.follow(busmod.COMPRESSED_STREAM, busmod.compressed_subject(stream_id))
    order = InOrder(stream_id, REORDER_WINDOW, start_seq, stats.gaps)

    received = 0  # batches that arrived (decodable or not): what expect_batches counts

    async def emit(c) -> None:
        frames = await receiver.decode(c)
        if frames is not None:
            writer.write(frames, c.width, c.height, Fraction(c.fps_num, c.fps_den))
            stats.batches += 1
            stats.frames += c.frame_count
            stats.compressed_bytes += len(c.payload)

    try:
        while stop is None or not stop.is_set():
            if expect_batches is not None and received >= expect_batches:
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
            except (SchemaError, ClaimError) as exc:
                stats.errors += 1
                log.error("undecodable_batch", subject=msg.subject, error=str(exc))
                continue
            # Batches are stored as workers finish them, a little out of order: the stream's first is
            # the lowest of what arrived by the time it was read to its end (or a window's worth).
            ready = order.add(cb, start=msg.metadata.num_pending == 0)
            if ready is None:
                continue  # duplicate delivery
            received += 1
            stats.held_max = order.held_max
            for c in ready:
                await emit(c)
        # Whatever is left arrived after a gap: decode it in order, and say so.
        for c in order.rest():
            await emit(c)
    finally:
        await sub.close()
        writer.close()
        stats.files = writer.files
    log.info("decode_done", stream_id=stream_id, batches=stats.batches, frames=stats.frames, gaps=len(stats.gaps),
             undecodable=len(stats.undecodable), keyframe_requests=stats.keyframe_requests, out=str(out))
    return stats
