"""Read a video source, cut it into batches of frames and publish them.

Sources are anything PyAV opens: files, ``rtsp://``, ``http://``, and
synthetic FFmpeg graphs written ``lavfi:testsrc2=size=1280x720:rate=30``.
Decoding runs in a thread; publishing runs on the event loop with a bounded
number of un-acked publishes, so a slow bus slows the reader (backpressure)
instead of filling memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from fractions import Fraction

import av
import numpy as np
from prometheus_client import Counter, Histogram
from tqdm import tqdm

from shared import bus as busmod
from shared.bus import Bus
from shared.logs import get_logger
from shared.pixfmt import frame_size, from_video_frame
from shared.schemas import STREAM_ID_RE, STREAM_ID_RULE, FrameBatch

log = get_logger("ingest")

BATCHES = Counter("aic_ingest_batches_total", "Frame batches published and acknowledged by JetStream", ["stream"])
FRAMES = Counter("aic_ingest_frames_total", "Frames published", ["stream"])
RAW_BYTES = Counter("aic_ingest_raw_bytes_total", "Raw frame bytes published", ["stream"])
DUPLICATES = Counter("aic_ingest_duplicates_total", "Batches whose id was taken already (published again)", ["stream"])
PUBLISH_SECONDS = Histogram(
    "aic_ingest_publish_seconds", "Publish of one batch until JetStream's ack (claim check included)", ["stream"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)  # fmt: skip


class SourceError(RuntimeError):
    """A source that cannot be opened or holds no video."""


LIVE_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "srt", "udp", "rtp", "tcp")


def open_source(source: str) -> av.container.InputContainer:
    """Open a PyAV input: a path, a URL, or ``lavfi:<filtergraph>``."""
    try:
        if source.startswith("lavfi:"):
            return av.open(source[len("lavfi:") :], format="lavfi")
        options = {"rtsp_transport": "tcp"} if source.startswith("rtsp://") else {}
        return av.open(source, options=options, timeout=10)
    except (av.FFmpegError, OSError) as exc:
        raise SourceError(f"cannot open {source!r}: {exc}") from None


def read_batches(
    source: str, stream_id: str, batch_frames: int = 8, max_frames: int | None = None, start_seq: int = 0
) -> Iterator[FrameBatch]:
    """Frame batches of a source, in order; the last one may be shorter."""
    if not STREAM_ID_RE.match(stream_id):
        raise ValueError(f"stream id must be {STREAM_ID_RULE}")
    if batch_frames < 1:
        raise ValueError("batch_frames must be >= 1")
    with open_source(source) as container:
        if not container.streams.video:
            raise SourceError(f"{source!r} has no video stream")
        vs = container.streams.video[0]
        vs.thread_type = "AUTO"
        rate = frame_rate(vs.guessed_rate or vs.average_rate or Fraction(30))
        # Frames are decoded straight into the batch's array (no per-frame copies to stack).
        buf: np.ndarray | None = None
        seq, n, k, first_pts = start_seq, 0, 0, 0
        size: tuple[int, int] | None = None
        for vf in container.decode(vs):
            if size is None:
                size = (vf.width, vf.height)
            elif (vf.width, vf.height) != size:
                # A mid-stream resolution change starts a new batch at the new size.
                if k:
                    yield _batch(stream_id, seq, size, rate, first_pts, buf[:k])
                    seq, buf, k = seq + 1, None, 0
                size = (vf.width, vf.height)
            if buf is None:
                rows = batch_frames if max_frames is None else min(batch_frames, max_frames - n)
                buf = np.empty((rows, frame_size(*size)), np.uint8)
            if k == 0:
                first_pts = n
            from_video_frame(vf, buf[k])
            n, k = n + 1, k + 1
            if k == len(buf):
                yield _batch(stream_id, seq, size, rate, first_pts, buf)
                seq, buf, k = seq + 1, None, 0
            if max_frames is not None and n >= max_frames:
                break
        if k:
            yield _batch(stream_id, seq, size, rate, first_pts, buf[:k])


def frame_rate(rate) -> Fraction:
    """A container's frame rate as a small exact fraction (30000/1001, 25, ...).

    Average rates measured from timestamps can be fractions like 29550583/986000, whose
    terms the batch schema refuses: a rate within 0.2 % of a standard one becomes that one,
    any other the nearest fraction with a denominator up to 1001.
    """
    rate = Fraction(rate)
    for std in STANDARD_RATES:
        if abs(rate / std - 1) < Fraction(2, 1000):
            return std
    return rate.limit_denominator(1001)


STANDARD_RATES = tuple(Fraction(n, d) for n, d in (
    (24000, 1001), (24, 1), (25, 1), (30000, 1001), (30, 1), (48, 1), (50, 1), (60000, 1001), (60, 1),
    (120, 1), (15, 1), (12, 1), (10, 1), (5, 1)))


def _batch(stream_id: str, seq: int, size: tuple[int, int], rate: Fraction, first_pts: int, frames: np.ndarray) -> FrameBatch:
    return FrameBatch(
        stream_id=stream_id,
        batch_seq=seq,
        width=size[0],
        height=size[1],
        fps_num=rate.numerator,
        fps_den=rate.denominator,
        first_pts=first_pts,
        captured_at=time.time(),
        frames=frames,
    )


async def _threaded(gen: Iterator[FrameBatch], depth: int = 3,
                    stop: asyncio.Event | None = None) -> AsyncIterator[FrameBatch]:
    """Run a blocking generator in a thread, at most ``depth`` items ahead of the consumer; ends
    when ``stop`` is set even while the source is stalled (a live feed that went quiet)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    room = threading.Semaphore(depth)
    done = object()
    cancelled = threading.Event()

    def work():
        try:
            for item in gen:
                room.acquire()
                if cancelled.is_set():
                    return
                loop.call_soon_threadsafe(queue.put_nowait, item)
        except BaseException as exc:  # surfaces in the consumer
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, done)

    thread = threading.Thread(target=work, name="ingest-reader", daemon=True)
    thread.start()
    try:
        while True:
            if stop is None:
                item = await queue.get()
            else:
                get, stopped = asyncio.ensure_future(queue.get()), asyncio.ensure_future(stop.wait())
                await asyncio.wait([get, stopped], return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                if not get.done():
                    get.cancel()
                    return
                item = get.result()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            room.release()
            yield item
    finally:
        cancelled.set()
        room.release()


class BatchNumberError(ValueError):
    """Batch numbers this ingest would reuse, or that another ingest of the stream is taking."""


class BatchNumbers:
    """A stream's next batch number, kept in the ``aic_ingest`` KV bucket.

    Every reservation is a compare-and-set on the entry's revision, so the number only ever
    grows and two gateways publishing one stream id are caught at their first batch instead of
    numbering the same batches twice.
    """

    def __init__(self, kv, stream_id: str):
        self.kv, self.stream_id = kv, stream_id
        self.revision: int | None = None

    async def load(self) -> int:
        """The first free number (0 for a new stream)."""
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await self.kv.get(self.stream_id)
        except KeyNotFoundError:  # KeyDeletedError is one too: create() takes the key back
            return 0
        self.revision = entry.revision
        try:
            return max(0, int(entry.value or b"0"))
        except ValueError:
            log.warning("ingest_cursor_invalid", stream_id=self.stream_id)
            return 0

    async def reserve(self, next_free: int) -> None:
        """Record that numbers below ``next_free`` are taken."""
        from nats.js.errors import KeyWrongLastSequenceError

        value = str(next_free).encode()
        try:
            if self.revision is None:
                self.revision = await self.kv.create(self.stream_id, value)
            else:
                self.revision = await self.kv.update(self.stream_id, value, last=self.revision)
        except KeyWrongLastSequenceError:
            raise BatchNumberError(
                f"another ingest is publishing stream {self.stream_id!r} (its batch numbers moved under this "
                f"one); run one gateway per stream id") from None


@dataclass
class IngestStats:
    stream_id: str
    batches: int = 0
    frames: int = 0
    raw_bytes: int = 0
    duplicates: int = 0
    seconds: float = 0.0
    batch_ids: list[str] = field(default_factory=list)


async def ingest(
    bus: Bus,
    source: str,
    stream_id: str,
    batch_frames: int = 8,
    max_frames: int | None = None,
    realtime: bool = False,
    in_flight: int = 4,
    progress: bool | None = None,
    stop: asyncio.Event | None = None,
    start_seq: int | None = None,
) -> IngestStats:
    """Publish a source's batches on ``aic.frames.<stream_id>``; returns what was published.
    ``start_seq`` None continues the stream's numbering where its last ingest stopped (0 at first)."""
    stats = IngestStats(stream_id)
    numbers = BatchNumbers(await bus.ingest_kv(), stream_id)
    next_free = await numbers.load()
    if start_seq is None:
        start_seq = next_free
    elif start_seq < next_free:
        # Reused numbers would be dropped as repeats inside the bus's duplicate window, and make
        # second rows (another capture time) after it: refused before anything is published.
        raise BatchNumberError(f"batches 0..{next_free - 1} of stream {stream_id!r} were published already; "
                               f"use --start-seq {next_free} or more (or leave it out), or a new stream id")
    subject = busmod.frames_subject(stream_id)
    # A network or device source is live whatever the pacing; a file or generator read at full speed
    # is a backlog without a deadline.
    live = realtime or source.split("://", 1)[0].lower() in LIVE_SCHEMES
    slots = asyncio.Semaphore(in_flight)
    pending: set[asyncio.Task] = set()
    errors: list[BaseException] = []
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=max_frames, unit="frame", desc=stream_id, disable=not show, leave=False)
    t0 = time.monotonic()

    async def publish(fb: FrameBatch) -> None:
        try:
            data = fb.pack()
            t = time.perf_counter()
            headers = {busmod.CAPTURED_HEADER: repr(fb.captured_at)}
            ack = await bus.publish(subject, data, fb.msg_id, kind="frames", headers=headers)
            taken = bool(ack.duplicate)
            if taken:
                # JetStream dedupes by id across the whole stream, so an id can be taken by a message on
                # another tenant's subject (published first to make the bus drop this one) as well as
                # by a retry of our own.  Again under an id nobody can guess: a batch that was ours
                # already is still coded once (payloads and rows are keyed by stream and number).
                log.warning("batch_id_taken", batch_id=fb.msg_id)
                ack = await bus.publish(subject, data, f"{fb.msg_id}#{secrets.token_hex(6)}", kind="frames",
                                        headers=headers)
            PUBLISH_SECONDS.labels(stream_id).observe(time.perf_counter() - t)
            BATCHES.labels(stream_id).inc()
            FRAMES.labels(stream_id).inc(fb.frame_count)
            RAW_BYTES.labels(stream_id).inc(fb.raw_bytes)
            DUPLICATES.labels(stream_id).inc(taken)
            stats.duplicates += taken
            log.debug("batch_published", batch_id=fb.msg_id, frames=fb.frame_count, bytes=len(data), seq=ack.seq)
        except BaseException as exc:
            errors.append(exc)
        finally:
            slots.release()

    try:
        async for fb in _threaded(read_batches(source, stream_id, batch_frames, max_frames, start_seq), stop=stop):
            if errors or (stop is not None and stop.is_set()):
                break
            if realtime:
                # Pace on the source clock: a batch leaves when its last frame would have been captured.
                due = t0 + (fb.first_pts + fb.frame_count) / fb.fps
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                # The source is read ahead of the clock: the batch is captured when it leaves, so that
                # latency counts from its last frame's (paced) capture, as a live camera's would.
                fb = dataclasses.replace(fb, captured_at=time.time())
            elif not live:
                fb = dataclasses.replace(fb, live=False)
            await slots.acquire()
            # Reserved before publishing, in order: a restart never reuses a number (a crash may
            # leave one unused, a gap receivers skip).
            await numbers.reserve(fb.batch_seq + 1)
            task = asyncio.create_task(publish(fb))
            pending.add(task)
            task.add_done_callback(pending.discard)
            stats.batches += 1
            stats.frames += fb.frame_count
            stats.raw_bytes += fb.raw_bytes
            stats.batch_ids.append(fb.msg_id)
            bar.update(fb.frame_count)
        if pending:
            await asyncio.gather(*pending)
    finally:
        bar.close()
    if errors:
        raise errors[0]
    stats.seconds = time.monotonic() - t0
    log.info(
        "ingest_done",
        stream_id=stream_id,
        batches=stats.batches,
        frames=stats.frames,
        raw_bytes=stats.raw_bytes,
        duplicates=stats.duplicates,
        seconds=round(stats.seconds, 3),
    )
    return stats
