"""A WHIP publish: the video a browser (or OBS, GStreamer) sends over WebRTC, cut into frame batches.

aiortc decodes the incoming VP8 or H.264; each decoded frame is converted to packed yuv420p and
batched like ``aic ingest`` batches a file: ``batch_frames`` frames per batch, a new batch at a
resolution change (browsers scale down under congestion), the last partial batch published when
the peer goes.  The batches are published by :func:`services.ingest.gateway.ingest`, so numbering,
retries, backpressure and loss accounting are the gateway's own.

Capture times come from the sender's clock: its RTCP sender reports map an RTP timestamp to its
wall clock (NTP), so a frame's capture is ``ntp + (rtp - rtp_sr) / 90 kHz``.  On one machine, or
with clocks kept by NTP, that is the glass of glass-to-row.  Until the first report arrives (about
a second into the call) a frame's arrival time stands in for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from fractions import Fraction

import av
import numpy as np

from shared.logs import get_logger
from shared.pixfmt import frame_size, from_video_frame
from shared.schemas import FrameBatch

log = get_logger("edge")

RTP_CLOCK = 90000  # the RTP clock of every video codec WebRTC carries
NTP_EPOCH = 2208988800  # seconds from 1900 (NTP) to 1970 (Unix)


def ntp_to_unix(ntp: int) -> float:
    """A 64-bit NTP timestamp (RTCP sender report) as Unix seconds."""
    return (ntp >> 32) - NTP_EPOCH + (ntp & 0xFFFFFFFF) / 2**32


class SenderClock:
    """The sender's wall clock at a received frame's RTP time, from its RTCP sender reports.

    aiortc keeps the reports to itself: this wraps the receiver's RTCP handler to see them, and
    reads the first RTP timestamp its decoder subtracts from frame times.  Both are aiortc's private
    parts (checked with 1.16); where they are missing, frames are timed by their arrival, and the
    log says so once."""

    def __init__(self, receiver):
        self.report: tuple[float, int] | None = None  # (sender's Unix time, its RTP timestamp)
        self._mapper = getattr(receiver, "_RTCRtpReceiver__timestamp_mapper", None)
        handler = getattr(receiver, "_handle_rtcp_packet", None)
        self.available = handler is not None and hasattr(self._mapper, "_origin")
        if not self.available:
            log.warning("capture_clock_unavailable", reason="this aiortc hides its RTCP sender reports: frames are "
                                                            "timed by their arrival")
            return

        async def handle(packet):
            info = getattr(packet, "sender_info", None)
            if info is not None:
                self.report = (ntp_to_unix(info.ntp_timestamp), info.rtp_timestamp)
            return await handler(packet)

        receiver._handle_rtcp_packet = handle

    def captured_at(self, frame: av.VideoFrame, arrived: float) -> float:
        """When ``frame`` was captured by the sender's clock (its arrival before the first report)."""
        if self.report is None or not self.available or frame.pts is None or self._mapper._origin is None:
            return arrived
        sent_at, rtp_sr = self.report
        rtp = (frame.pts + self._mapper._origin) & 0xFFFFFFFF
        delta = (rtp - rtp_sr + 2**31) % 2**32 - 2**31  # signed, across a wrap of the 32-bit clock
        at = sent_at + delta / RTP_CLOCK
        # A sender clock ahead of ours (another machine) would date frames in the future: arrival bounds it.
        return min(at, arrived)


@dataclass
class Batcher:
    """Decoded frames → :class:`FrameBatch` es of ``batch_frames`` frames, numbered from 0 (the gateway
    moves them after the stream's last batch); a change of frame size closes the batch before it."""

    stream_id: str
    batch_frames: int = 8
    # The batches' rate: measured on the first batch from its frames' RTP times (WebRTC has no fixed
    # rate; a camera that slows down later keeps its capture times, not this figure).
    fps: Fraction = Fraction(30)
    seq: int = 0
    frames: int = 0
    resizes: int = 0
    _buf: list[np.ndarray] = field(default_factory=list)
    _captured: float = 0.0  # the capture time of the frame held last
    _pts: list[int] = field(default_factory=list)
    _size: tuple[int, int] | None = None
    _measured: bool = False

    def add(self, vf: av.VideoFrame, captured_at: float) -> list[FrameBatch]:
        """The batches this frame completes (none, one, or the one it closed by changing size and
        itself as a batch of one frame when ``batch_frames`` is 1)."""
        out = []
        # yuv420p needs even sizes; a browser's odd crop loses its last row or column.
        w, h = vf.width & ~1, vf.height & ~1
        if (w, h) != (vf.width, vf.height) or vf.format.name != "yuv420p":
            vf = vf.reformat(width=w, height=h, format="yuv420p")
        if self._size is not None and (w, h) != self._size:
            self.resizes += 1
            out += self.flush()
        self._size = (w, h)
        self._buf.append(from_video_frame(vf, np.empty(frame_size(w, h), np.uint8)))
        self._captured = captured_at
        if vf.pts is not None:
            self._pts.append(vf.pts)
        if len(self._buf) >= self.batch_frames:
            out += self.flush()
        return out

    def flush(self) -> list[FrameBatch]:
        """The frames held as one (shorter) batch; nothing when none are held."""
        if not self._buf:
            return []
        if not self._measured and len(self._pts) == len(self._buf) >= 4 and self._pts[-1] > self._pts[0]:
            rate = (len(self._pts) - 1) * RTP_CLOCK / (self._pts[-1] - self._pts[0])
            self.fps, self._measured = Fraction(max(1, min(120, round(rate)))), True
        w, h = self._size
        fb = FrameBatch(stream_id=self.stream_id, batch_seq=self.seq, width=w, height=h,
                        fps_num=self.fps.numerator, fps_den=self.fps.denominator, first_pts=self.frames,
                        # as for a live camera: a batch is captured when its last frame is
                        captured_at=self._captured, frames=np.stack(self._buf))
        self.seq += 1
        self.frames += len(self._buf)
        self._buf, self._pts = [], []
        return [fb]


@dataclass
class PublishStats:
    frames: int = 0
    batches: int = 0
    resizes: int = 0
    unpublished: int = 0  # batches dropped because the gateway was not taking them (the bus away at start)
    ended: str = ""  # why: "deleted", "peer gone", "idle", "shutdown"
    capture_lag_s: list[float] = field(default_factory=list)  # arrival - capture by the sender's clock (sampled)


async def track_batches(track, batcher: Batcher, clock: SenderClock, idle_s: float, stats: PublishStats,
                        ended: asyncio.Event, depth: int = 32):
    """The batches of a received video track until it ends (the peer closed, went away or sent
    nothing for ``idle_s``), or ``ended`` is set; the partial batch last.

    The track is read in a task of its own: aiortc queues decoded frames without a bound, so they
    are taken as they come and at most ``depth`` batches wait for the gateway (while the bus is away
    at the start; then the oldest go, counted in ``stats.unpublished``).  Batches are numbered as
    they are handed on, so a dropped one leaves no gap in the numbers, only in the frames."""
    from aiortc.mediastreams import MediaStreamError

    ready: asyncio.Queue = asyncio.Queue()
    finished = object()

    def put(fb: FrameBatch) -> None:
        if ready.qsize() >= depth:
            ready.get_nowait()
            stats.unpublished += 1
        ready.put_nowait(fb)

    async def read() -> None:
        try:
            while not ended.is_set():
                recv = asyncio.ensure_future(track.recv())
                stop = asyncio.ensure_future(ended.wait())
                done, _ = await asyncio.wait({recv, stop}, timeout=idle_s, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if recv not in done:
                    recv.cancel()
                    stats.ended = stats.ended or ("idle" if not done else "deleted")
                    break
                try:
                    vf = recv.result()
                except MediaStreamError:
                    stats.ended = stats.ended or "peer gone"
                    break
                arrived = time.time()
                captured = clock.captured_at(vf, arrived)
                if clock.report is not None and stats.frames % 8 == 0 and len(stats.capture_lag_s) < 4096:
                    stats.capture_lag_s.append(arrived - captured)
                stats.frames += 1
                for fb in batcher.add(vf, captured):
                    put(fb)
            for fb in batcher.flush():
                put(fb)
        finally:
            stats.resizes = batcher.resizes
            ready.put_nowait(finished)

    reader = asyncio.create_task(read(), name="whip-reader")
    seq = 0
    try:
        while (fb := await ready.get()) is not finished:
            stats.batches += 1
            yield dataclasses.replace(fb, batch_seq=seq)
            seq += 1
        await reader  # (its error, if it had one)
    finally:
        reader.cancel()
