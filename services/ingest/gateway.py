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
from nats import errors as nats_errors
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError
import numpy as np
from prometheus_client import Counter, Histogram
from tqdm import tqdm

from shared import bus as busmod
from shared.bus import Bus, StreamFull, TopologyMissing
from shared.logs import get_logger
from shared.pixfmt import frame_size, from_video_frame
from shared.schemas import STREAM_ID_RE, STREAM_ID_RULE, FrameBatch, Limits

log = get_logger("ingest")

BATCHES = Counter("aic_ingest_batches_total", "Frame batches published and acknowledged by JetStream", ["stream"])
FRAMES = Counter("aic_ingest_frames_total", "Frames published", ["stream"])
RAW_BYTES = Counter("aic_ingest_raw_bytes_total", "Raw frame bytes published", ["stream"])
DUPLICATES = Counter("aic_ingest_duplicates_total", "Batches whose id was taken already (published again)", ["stream"])
PUBLISH_SECONDS = Histogram(
    "aic_ingest_publish_seconds", "Publish of one batch until JetStream's ack (claim check included)", ["stream"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)  # fmt: skip


DROPPED = Counter("aic_ingest_dropped_total", "Batches of a live source dropped while the bus was away (each gets a "
                  "rejected row, reason dropped_at_gateway)", ["stream"])
RETRIES = Counter("aic_ingest_publish_retries_total", "Publishes tried again after no ack (same message id)", ["stream"])
FULL = Counter("aic_ingest_stream_full_total", "Publishes refused because the frames stream was at its bound "
               "(tried again: backpressure)", ["stream"])

#: How long the gateway keeps trying a publish that gets no ack before it gives up (``--outage-s``).
OUTAGE_S = 120.0
#: One try's wait for JetStream's ack; then the same message id again (duplicates are dropped).
ATTEMPT_S = 5.0


class SourceError(RuntimeError):
    """A source that cannot be opened or holds no video."""


class BusOutage(ConnectionError):
    """The bus stayed away (or its frames stream full) longer than the outage bound; ``batches`` did
    not reach it."""

    def __init__(self, stream_id: str, batches: list[int], outage_s: float, full: bool = False):
        self.stream_id, self.batches = stream_id, sorted(batches)
        what = f"batches {ranges_text(self.batches)} of {stream_id} did not reach it" if self.batches else \
            f"no batch of {stream_id} was read"
        why = ("its frames stream stayed full (are the compressors running? `aic top` shows the backlog)"
               if full else "it acknowledged nothing")
        super().__init__(f"the bus took no batch for {outage_s:g} s, {why}: {what} (run the ingest again when it "
                         "is back: the numbering continues after the last batch it acknowledged)")


def ranges_text(numbers: list[int]) -> str:
    """Sorted [1, 2, 3, 7] → '1-3, 7'."""
    out: list[list[int]] = []
    for n in numbers:
        if out and n == out[-1][1] + 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out) or "none"


#: What a bus that is away (or restarting) raises; anything else is an answer, not an outage.
_TRANSIENT = (asyncio.TimeoutError, ConnectionError, nats_errors.TimeoutError, nats_errors.NoRespondersError,
              nats_errors.StaleConnectionError, nats_errors.OutboundBufferLimitError,
              nats_errors.ConnectionClosedError, nats_errors.NoServersError, nats_errors.ConnectionReconnectingError,
              nats_errors.ConnectionDrainingError, ServiceUnavailableError,
              NoStreamResponseError)  # (a KV bucket's stream electing its leader on a cluster)


class Outage:
    """When the bus last stopped acknowledging, shared by every publish of one ingest: an outage is
    measured once, from its first unanswered try, not again by each batch waiting behind it."""

    def __init__(self, bound_s: float):
        self.bound_s, self.since, self.full = bound_s, None, False
        self.stream_seen = False  # a batch was stored: "no stream" later is a cluster electing a leader

    def failed(self, full: bool = False) -> float:
        """Seconds since the outage began; ``full``: this try was refused for want of room."""
        now = time.monotonic()
        self.since = self.since or now
        self.full = full
        return now - self.since

    def ok(self) -> None:
        self.since, self.full = None, False


async def until_acked(what: str, attempt, outage: Outage, stream_id: str):
    """(``await attempt()``, whether it took more than one try): tried again (the same message, so the
    same id) after a try that got no answer, while the outage lasts less than its bound; then
    ``TimeoutError``.  Refusals (permissions, a missing stream) are not retried: they do not pass."""
    delay, tries = 0.2, 0
    while True:
        tries += 1
        try:
            result = await asyncio.wait_for(attempt(), ATTEMPT_S)
            outage.ok()
            return result, tries > 1
        except (*_TRANSIENT, TopologyMissing, StreamFull) as exc:
            if isinstance(exc, TopologyMissing) and outage.since is None and not outage.stream_seen:
                raise  # no stream takes the subject, and the bus is there: an answer, not an outage
            full = isinstance(exc, StreamFull)
            lasted = outage.failed(full)
            if lasted >= outage.bound_s:
                raise TimeoutError(f"{what}: no ack for {outage.bound_s:g} s") from None
            RETRIES.labels(stream_id).inc()
            FULL.labels(stream_id).inc(full)
            # (A full frames stream is backpressure: the workers are behind, and room comes as they ack.)
            log.warning("publish_retry", stream_id=stream_id, what=what, error=type(exc).__name__,
                        reason="frames stream full" if full else "no ack", outage_s=round(lasted, 1))
            await asyncio.sleep(min(delay, max(0.05, outage.bound_s - lasted)))
            delay = min(2.0, delay * 2)


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


def check_request(stream_id: str, batch_frames: int, max_frames: int | None, limits: Limits = Limits()) -> None:
    """What an ingest is asked for, checked before anything is read or published: a batch larger
    than the workers accept would be published and then rejected, every one of them."""
    if not STREAM_ID_RE.match(stream_id):
        raise ValueError(f"stream id {stream_id!r}: must be {STREAM_ID_RULE}")
    if not 1 <= batch_frames <= limits.max_frames:
        raise ValueError(f"--batch-frames {batch_frames}: must be 1..{limits.max_frames} (the workers' limit per batch)")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"--frames {max_frames}: must be at least 1 (or left out: the whole source)")


def _frames(container, vs, damage: "SourceDamage | None", source: str = "") -> Iterator:
    """The decoded frames of ``vs``: a packet the decoder cannot read (a corrupt one in a broadcast
    capture, say) is skipped and counted, not the end of the source.  A source that stops answering
    (an http server that stalls past the 10 s read timeout) or breaks off is a :class:`SourceError`."""
    packets = container.demux(vs)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except (av.FFmpegError, OSError) as exc:
            raise SourceError(f"reading {source or 'the source'} failed: {exc} (a stalled or broken source; the "
                              "batches read before it are published)") from None
        try:
            frames = packet.decode()
        except av.InvalidDataError as exc:
            if damage is not None:
                damage.corrupt_packets += 1
            log.warning("corrupt_packet_skipped", pts=packet.pts, error=str(exc)[:200])
            continue
        yield from frames


def _until_broken(frames: Iterator, broke: list) -> Iterator:
    """``frames`` until a :class:`SourceError`, which lands in ``broke`` instead of escaping."""
    try:
        yield from frames
    except SourceError as exc:
        broke.append(exc)


@dataclass
class SourceDamage:
    """What a source's reading survived: corrupt packets skipped, and whether it ended before the
    length its container declares (a truncated file)."""

    corrupt_packets: int = 0
    frames_read: int = 0
    frames_declared: int | None = None  # from the container (frame count, else duration x rate)

    @property
    def truncated(self) -> bool:
        d = self.frames_declared
        return d is not None and self.frames_read < d - max(8, d // 50)


def read_batches(
    source: str, stream_id: str, batch_frames: int = 8, max_frames: int | None = None, start_seq: int = 0,
    damage: SourceDamage | None = None,
) -> Iterator[FrameBatch]:
    """Frame batches of a source, in order; the last one may be shorter.  Corrupt packets are
    skipped, and counted in ``damage``."""
    check_request(stream_id, batch_frames, max_frames)
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
        if damage is not None:
            damage.frames_declared = vs.frames or (round(container.duration / 1e6 * rate) if container.duration else None)
        broke: list[SourceError] = []
        for vf in _until_broken(_frames(container, vs, damage, repr(source)), broke):
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
            if damage is not None:
                damage.frames_read = n
            if k == len(buf):
                yield _batch(stream_id, seq, size, rate, first_pts, buf)
                seq, buf, k = seq + 1, None, 0
            if max_frames is not None and n >= max_frames:
                if damage is not None:
                    damage.frames_declared = None  # stopped on purpose: no claim about the rest
                break
        if k:  # the last, shorter batch; also of a source that broke off: what was read goes out
            yield _batch(stream_id, seq, size, rate, first_pts, buf[:k])
        if broke:
            raise broke[0]
        if damage is not None and damage.truncated:
            log.warning("source_truncated", frames_read=damage.frames_read, frames_declared=damage.frames_declared)


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


async def _renumbered(batches: AsyncIterator[FrameBatch], start_seq: int) -> AsyncIterator[FrameBatch]:
    """A made-elsewhere source's batches (numbered from 0) after the stream's last published one."""
    async for fb in batches:
        yield dataclasses.replace(fb, batch_seq=fb.batch_seq + start_seq) if start_seq else fb


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
        self.reserved = 0
        self.nonce = secrets.token_hex(4)

    async def load(self) -> int:
        """The first free number (0 for a new stream)."""
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await self.kv.get(self.stream_id)
        except KeyNotFoundError:  # KeyDeletedError is one too: create() takes the key back
            return 0
        self.revision = entry.revision
        try:
            self.reserved = max(0, int((entry.value or b"0").split()[0]))
            return self.reserved
        except (ValueError, IndexError):
            log.warning("ingest_cursor_invalid", stream_id=self.stream_id)
            return 0

    async def reserve(self, next_free: int) -> None:
        """Record that numbers below ``next_free`` are taken (a lower number than recorded: nothing to do)."""
        from nats.js.errors import KeyWrongLastSequenceError

        if next_free <= self.reserved:
            return
        # The value names this gateway, so that a write whose ack was lost (and is tried again) is
        # told apart from another gateway's.
        value = f"{next_free} {self.nonce}".encode()
        try:
            if self.revision is None:
                self.revision = await self.kv.create(self.stream_id, value)
            else:
                self.revision = await self.kv.update(self.stream_id, value, last=self.revision)
            self.reserved = next_free
        except KeyWrongLastSequenceError:
            entry = await self.kv.get(self.stream_id)
            if entry.value == value:  # our own write, applied before its ack got lost
                self.revision, self.reserved = entry.revision, next_free
                return
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
    dropped: int = 0  # live batches dropped while the bus was away (each with a rejected row)
    damage: SourceDamage = field(default_factory=SourceDamage)
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
    outage_s: float = OUTAGE_S,
    buffer_batches: int = 32,
    batches: AsyncIterator[FrameBatch] | None = None,
) -> IngestStats:
    """Publish a source's batches on ``aic.frames.<stream_id>``; returns what was published.
    ``batches``: a live source's batches made elsewhere (a WebRTC publish, services/edge), numbered
    from 0, published in place of reading ``source`` (then only a name for the logs).
    ``start_seq`` None continues the stream's numbering where its last ingest stopped (0 at first).

    Nothing acknowledged to the gateway is lost: a publish without JetStream's ack is tried again
    with the same message id (the bus drops repeats) for up to ``outage_s``.  A file pauses while the
    bus is away (at most ``in_flight`` batches wait); a live source keeps capturing, holds up to
    ``buffer_batches`` batches, and drops those beyond, each counted and given a rejected row
    (``dropped_at_gateway``) once the bus is back.  Past ``outage_s`` without an ack, :class:`BusOutage`
    names the batches that did not reach the bus."""
    limits = Limits()  # the workers' (their defaults: a gateway cannot know a deployment's own)
    check_request(stream_id, batch_frames, max_frames, limits)
    stats = IngestStats(stream_id)
    numbers = BatchNumbers(await bus.ingest_kv(), stream_id)
    outage = Outage(outage_s)
    try:
        next_free, _ = await until_acked("reading the stream's numbering", numbers.load, outage, stream_id)
    except TimeoutError:
        raise BusOutage(stream_id, [], outage_s) from None
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
    live = batches is not None or realtime or source.split("://", 1)[0].lower() in LIVE_SCHEMES
    slots = asyncio.Semaphore(in_flight)
    pending: set[asyncio.Task] = set()
    errors: list[BaseException] = []
    unsent: set[int] = set()  # batches read whose publish has not been acknowledged yet
    in_order = asyncio.Lock()  # numbers are reserved in batch order, each before its batch goes out
    async def reserve(seq: int) -> None:
        async with in_order:
            await until_acked(f"reserving batch {seq}", lambda: numbers.reserve(seq + 1), outage, stream_id)
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=max_frames, unit="frame", desc=stream_id, disable=not show, leave=False)
    t0 = time.monotonic()

    async def send(data: bytes, msg_id: str, headers: dict, what: str):
        """(ack, whether it took more than one try).  The chunks of a claim-checked batch carry a secret
        tag, the same on every try: a retry dedupes against its own chunks, nobody else can take their ids."""
        tag = secrets.token_hex(8)
        return await until_acked(what, lambda: bus.publish(subject, data, msg_id, kind="frames", headers=headers,
                                                           tag=tag), outage, stream_id)

    async def publish(fb: FrameBatch, slotted: bool) -> None:
        try:
            await reserve(fb.batch_seq)
            data = fb.pack()
            t = time.perf_counter()
            headers = {busmod.CAPTURED_HEADER: repr(fb.captured_at)}
            ack, again = await send(data, fb.msg_id, headers, f"batch {fb.batch_seq}")
            # A repeat after a try whose ack was lost is our own message, stored once.
            taken = bool(ack.duplicate) and not again
            if taken:
                # JetStream dedupes by id across the whole stream, so an id can be taken by a message on
                # another tenant's subject (published first to make the bus drop this one) as well as
                # by a retry of our own.  Again under an id nobody can guess: a batch that was ours
                # already is still coded once (payloads and rows are keyed by stream and number).
                log.warning("batch_id_taken", batch_id=fb.msg_id)
                ack, _ = await send(data, f"{fb.msg_id}#{secrets.token_hex(6)}", headers, f"batch {fb.batch_seq}")
            outage.stream_seen = True
            PUBLISH_SECONDS.labels(stream_id).observe(time.perf_counter() - t)
            BATCHES.labels(stream_id).inc()
            FRAMES.labels(stream_id).inc(fb.frame_count)
            RAW_BYTES.labels(stream_id).inc(fb.raw_bytes)
            DUPLICATES.labels(stream_id).inc(taken)
            stats.duplicates += taken
            log.debug("batch_published", batch_id=fb.msg_id, frames=fb.frame_count, bytes=len(data), seq=ack.seq)
            unsent.discard(fb.batch_seq)
        except BaseException as exc:
            errors.append(exc)
        finally:
            if slotted:
                slots.release()

    async def report_dropped(seq: int, msg_id: str, captured_at: float, why: str) -> None:
        """A dropped live batch's number, taken in order, and its marker once the bus is back: the
        worker turns it into a rejected row, so the loss is counted where every batch is.  (Its frames
        are not held: an outage drops many.)"""
        try:
            await reserve(seq)
            headers = {busmod.CAPTURED_HEADER: repr(captured_at), busmod.DROPPED_HEADER: why}
            await send(b"", msg_id, headers, f"marker of dropped batch {seq}")
            stats.dropped += 1
            unsent.discard(seq)
        except BaseException as exc:
            errors.append(exc)

    source_error: SourceError | None = None
    try:
        try:
            if batches is None:
                source_batches = _threaded(read_batches(source, stream_id, batch_frames, max_frames, start_seq,
                                                        stats.damage), stop=stop)
            else:
                source_batches = _renumbered(batches, start_seq)
            async for fb in source_batches:
                if errors or (stop is not None and stop.is_set()):
                    break
                if realtime and batches is None:
                    # Pace on the source clock: a batch leaves when its last frame would have been captured.
                    due = t0 + (fb.first_pts + fb.frame_count) / fb.fps
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                    # The source is read ahead of the clock: the batch is captured when it leaves, so that
                    # latency counts from its last frame's (paced) capture, as a live camera's would.
                    fb = dataclasses.replace(fb, captured_at=time.time())
                elif not live:
                    fb = dataclasses.replace(fb, live=False)
                if fb.raw_bytes > limits.max_batch_bytes:
                    raise ValueError(f"a batch of {fb.frame_count} frames at {fb.width}x{fb.height} is {fb.raw_bytes >> 20} "
                                     f"MiB, over the workers' {limits.max_batch_bytes >> 20} MiB: use fewer --batch-frames")
                unsent.add(fb.batch_seq)
                if live and len(pending) >= in_flight + buffer_batches:
                    # The bus is away and the buffer is full: a live source cannot wait.
                    DROPPED.labels(stream_id).inc()
                    log.warning("batch_dropped", stream_id=stream_id, batch_seq=fb.batch_seq, buffered=len(pending))
                    why = "the frames stream was full" if outage.full else "the bus was away"
                    task = asyncio.create_task(report_dropped(fb.batch_seq, fb.msg_id, fb.captured_at, why))
                else:
                    if not live:
                        await slots.acquire()  # a file waits for the bus; a live source cannot
                    # Reserved in the task, in order and before its publish: a restart never reuses a
                    # number (a crash may leave one unused, a gap receivers skip).
                    task = asyncio.create_task(publish(fb, slotted=not live))
                pending.add(task)
                task.add_done_callback(pending.discard)
                stats.batches += 1
                stats.frames += fb.frame_count
                stats.raw_bytes += fb.raw_bytes
                if batches is None:  # (a WebRTC publish may last for days: its ids are not kept)
                    stats.batch_ids.append(fb.msg_id)
                bar.update(fb.frame_count)
        except SourceError as exc:  # the source broke off: what was read still goes out, then the error
            source_error = exc
        while pending and not errors:
            await asyncio.wait(set(pending), return_when=asyncio.FIRST_COMPLETED)
        if pending:  # given up: what is still retrying did not reach the bus either
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    finally:
        bar.close()
    if errors:
        if any(isinstance(e, TimeoutError) for e in errors):
            raise BusOutage(stream_id, sorted(unsent), outage_s, outage.full)
        raise errors[0]
    if source_error is not None:
        raise SourceError(f"{source_error} ({stats.batches} batches, {stats.frames} frames, were published before "
                          "it; an ingest run again continues the numbering)")
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
