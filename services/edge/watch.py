"""A WHEP viewer: a stream's delivered video, as ``aic decode`` reconstructs it, sent to a browser.

One :class:`StreamTap` per watched stream follows its compressed batches from the newest on and
decodes them once, in order, for all of its viewers (a chained batch predicts from the batch
before; one that joins mid-chain asks the workers for a key frame, as ``aic decode`` does).  Each
viewer's :class:`DeliveredTrack` plays the decoded frames out at the stream's frame rate and
aiortc re-encodes them (VP8 or H.264) for the last hop: the payloads themselves are aic's own
(chained x264 with reordering, learned codecs), which no browser decodes.  That costs one encode
per viewer and a second generation of loss, measured in docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from collections import deque

import av
from aiortc import MediaStreamTrack

from services.receiver.decode import DecodeStats, InOrder, Receiver
from shared import bus as busmod
from shared.bus import Bus, ClaimError
from shared.logs import get_logger
from shared.pixfmt import to_video_frame
from shared.schemas import SchemaError, unpack_compressed_batch

log = get_logger("edge")

RTP_CLOCK = 90000
#: Frames a viewer may fall behind before the oldest are dropped (latency stays bounded).
VIEWER_QUEUE = 24
#: Batches held back waiting for a missing one before it is skipped (several workers finish out of
#: order; fewer than ``aic decode`` holds: a viewer is live).
REORDER = 4
#: Added to the first frame's delay: batches arrive every batch_frames / fps, give or take.
PLAYOUT_MARGIN_S = 0.1
#: A viewer this far off its schedule (behind after a stall, or a new publish's clock) starts again.
RESYNC_S = 0.5


class DeliveredTrack(MediaStreamTrack):
    """A viewer's video track: the tap's decoded frames, played out on the source's clock.

    A frame is sent at its capture time plus a delay fixed by the first one (and a margin for the
    jitter of batches arriving); a viewer more than ``RESYNC_S`` off that schedule starts again from
    the frame it has.  The frames' pts run on their capture clock (90 kHz), so the viewer's RTP
    timestamps are capture times; :attr:`sent` keeps (pts, capture time, send time) of the last
    frames, which the WHEP session resource serves for glass-to-viewer latency."""

    kind = "video"

    def __init__(self, tap: "StreamTap | None" = None):
        super().__init__()
        self.tap = tap  # set once the viewer's session is answered
        self.queue: asyncio.Queue = asyncio.Queue()
        self.sent: deque = deque(maxlen=600)
        self.dropped = 0
        self._delay: float | None = None
        self._last: tuple[int, float] | None = None  # (pts, capture time) of the frame sent last

    def offer(self, vf: av.VideoFrame, captured_at: float) -> None:
        """A decoded frame for this viewer; the oldest waiting is dropped when it is too far behind."""
        if self.queue.qsize() >= VIEWER_QUEUE:
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait((vf, captured_at))

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            from aiortc.mediastreams import MediaStreamError

            raise MediaStreamError
        vf, captured = await self.queue.get()
        if self._delay is None:
            # Frames queued while ICE and DTLS came up are old: start from the newest.
            while not self.queue.empty():
                vf, captured = self.queue.get_nowait()
        now = time.time()
        if self._delay is None or abs(now - (captured + self._delay)) > RESYNC_S:
            self._delay = now - captured + PLAYOUT_MARGIN_S
        wait = captured + self._delay - now
        if wait > 0:
            await asyncio.sleep(wait)
        if self._last is None:
            pts = 0
        elif captured > self._last[1]:
            pts = self._last[0] + max(1, round((captured - self._last[1]) * RTP_CLOCK))
        else:  # a new publish of the stream: its clock starts again
            pts = self._last[0] + RTP_CLOCK // 30
        self._last = (pts, captured)
        vf.pts, vf.time_base = pts, fractions.Fraction(1, RTP_CLOCK)
        self.sent.append((pts, captured, time.time()))
        return vf

    def stop(self) -> None:
        super().stop()
        if self.tap is not None:
            self.tap.viewers.discard(self)


class StreamTap:
    """A stream's compressed batches, followed from the newest and decoded once for its viewers."""

    def __init__(self, bus: Bus, stream_id: str):
        self.bus, self.stream_id = bus, stream_id
        self.viewers: set[DeliveredTrack] = set()
        self.stats = DecodeStats(stream_id)
        self.receiver = Receiver(bus, stream_id, self.stats)
        self.task: asyncio.Task | None = None
        self.last: dict | None = None  # the newest batch decoded: codec, size, bytes (for the page)

    def start(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run(), name=f"tap-{self.stream_id}")

    async def _run(self) -> None:
        """Follow and decode until the last viewer goes; the bus going away, or a batch that cannot be
        read, is logged and gone past (viewers see the video stop, then resume), never the tap's end."""
        from nats.js import api as jsapi

        while self.viewers:
            try:
                sub = await self.bus.follow(busmod.COMPRESSED_STREAM, busmod.compressed_subject(self.stream_id),
                                            deliver_policy=jsapi.DeliverPolicy.LAST)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("tap_follow_failed", stream_id=self.stream_id, error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(1.0)
                continue
            try:
                await self._follow(sub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("tap_interrupted", stream_id=self.stream_id, error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(1.0)
            finally:
                await sub.close()

    async def _follow(self, sub) -> None:
        order = InOrder(self.stream_id, REORDER)  # from the first batch that comes: the newest
        while self.viewers:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except Exception as exc:
                if "Timeout" in type(exc).__name__:
                    continue
                raise
            try:
                cb = unpack_compressed_batch(await self.bus.payload(msg))
            except (SchemaError, ClaimError) as exc:
                log.error("undecodable_batch", stream_id=self.stream_id, error=str(exc))
                continue
            for cb in order.add(cb) or []:
                try:
                    await self._emit(cb)
                except Exception as exc:  # a codec that raised something of its own: this batch only
                    log.error("tap_decode_failed", stream_id=self.stream_id, batch_seq=cb.batch_seq,
                              error=f"{type(exc).__name__}: {exc}")

    async def _emit(self, cb) -> None:
        frames = await self.receiver.decode(cb)
        if frames is None:
            return
        self.last = {"batch_seq": cb.batch_seq, "codec": cb.codec, "width": cb.width, "height": cb.height,
                     "bytes": len(cb.payload), "frames": cb.frame_count}
        step = cb.fps_den / cb.fps_num
        n = len(frames)
        for i, f in enumerate(frames):
            captured = cb.captured_at - (n - 1 - i) * step  # the batch is captured at its last frame
            for v in list(self.viewers):
                v.offer(to_video_frame(f, cb.width, cb.height), captured)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
