"""The compressor worker.

Per batch: validate → encode → decode the payload as a receiver would →
measure quality → publish the CompressedBatch, the reference for the stream's
next batch (chained streams), and the BatchMetrics → ack.  A native codec
that can chain (x264, SVT-AV1) codes each batch against the previous batch's
last decoded frame (:mod:`services.compressor.handoff`); a batch that cannot
starts with a real key frame, and its row says why (``keyframe_reason``).  The
ack comes only after the payload and the row are acknowledged by JetStream,
so a worker killed at any point loses nothing: the batch is redelivered, and
message ids plus the metrics table's primary key make the retry invisible.
CPU work runs in a thread pool; the event loop only does I/O.

A batch that outlives its timeout leaves a codec thread that Python cannot
stop (and, for a learned codec, the model's lock with it): the worker then
stops fetching, gives the batch back, and exits with :data:`EXIT_WEDGED` so
that its supervisor starts a fresh process, rather than timing out every
batch queued behind the stuck one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from nats.aio.msg import Msg
from nats.js.errors import NotFoundError
from prometheus_client import Counter, Gauge, Histogram

from shared import bus as busmod
from shared.bus import Bus, ClaimError, StreamFull
from shared.bus import unsubscribe as _unsubscribe
from shared.aio import pause
from services.compressor.choice import CodecChoice, parse_try_codec
from services.compressor.controls import StreamControls
from services.compressor.handoff import POLL_S, Handed, ReferenceStore, chain_key
from services.compressor.policy import Policy
from services.compressor.speed import PresetGovernor
from shared.codecs import LEARNED_CODECS, NATIVE_CODECS, create_codec, learned_available, read_header
from shared.config import CompressorConfig
from shared.logs import get_logger
from shared.quality import measure_batch
from shared.schemas import (
    MAX_TIMESTAMP,
    STREAM_ID_RE,
    BatchMetrics,
    CompressedBatch,
    FrameBatch,
    SchemaError,
    pack_dead_letter,
    peek_ids,
    unpack_frame_batch,
)

log = get_logger("compressor")

BATCHES = Counter("aic_compressor_batches_total", "Batches handled", ["status"])
FALLBACKS = Counter("aic_compressor_fallbacks_total", "Batches sent natively instead of neurally", ["reason"])
BATCH_SECONDS = Histogram("aic_compressor_batch_seconds", "Wall time per batch, fetch to ack")
ENCODE_SECONDS = Histogram("aic_compressor_encode_seconds", "Coding time per batch (policy included)", ["codec"],
                           buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32))
PSNR_Y = Histogram("aic_compressor_psnr_y_db", "PSNR-Y of delivered batches", ["codec"],
                   buckets=(20, 25, 28, 30, 32, 34, 36, 38, 40, 45, 50, 100))
PENDING = Gauge("aic_consumer_pending", "Frame batches waiting or in flight on the shared compressor consumer")
PENDING_EVERY_S = 10.0
OUTPUTS_FULL = Counter("aic_compressor_outputs_full_total", "Output publishes refused for want of room (tried again "
                       "in place: the server's store is full)")
EXPIRED = Counter("aic_compressor_expired_total", "Frame batches that waited unprocessed until their expiry margin "
                  "(each gets a failed row, reason expired)")
#: How often a worker looks for frame batches about to expire unprocessed.
EXPIRY_EVERY_S = 10.0

#: Exit status of a worker whose codec thread hung past the batch timeout (EX_SOFTWARE).
EXIT_WEDGED = 70
#: How long a wedged worker lets its other batches finish before it gives them back.
WEDGED_GRACE_S = 5.0

#: The streams a worker reads or writes: it waits for them (``aic up`` creates them) at start.
COMPRESSOR_STREAMS = (busmod.FRAMES_STREAM, busmod.COMPRESSED_STREAM, busmod.METRICS_STREAM, busmod.DEADLETTER_STREAM,
                      busmod.BLOBS_STREAM, busmod.ADVISORY_STREAM, busmod.REFS_STREAM, busmod.CONTROL_STREAM)


@dataclass(frozen=True)
class Outcome:
    """What processing one message produced; ``compressed`` is None for rejects."""

    metrics: BatchMetrics
    compressed: CompressedBatch | None = None
    handoff: np.ndarray | None = None  # chained streams: the frame the next batch predicts from
    since: int | None = None  # the batch whose real key frame began its chain
    chain: str | None = None  # the chain it belongs to (chain_of): its stream, or its segment
    last_of_chain: bool = False  # the last batch of a segment: no batch will predict from it


def keyframe_every(cfg: CompressorConfig, fps: float, frames: int) -> int:
    """Batches between periodic real key frames (0: none), the same on every worker."""
    if not cfg.keyframe_every_s:
        return 0
    return max(1, round(cfg.keyframe_every_s * fps / frames))


def planned_keyframe(fb, cfg: CompressorConfig) -> str | None:
    """Why a batch of a chained stream starts with a real key frame whatever reference it would find
    (``segment``, ``periodic``), or None: such a batch does not wait for its predecessor's reference.
    The same on every worker and every delivery (it depends on the batch alone)."""
    seq = fb.batch_seq
    if seq and not fb.live and cfg.segment_batches and seq % cfg.segment_batches == 0:
        return "segment"
    every = keyframe_every(cfg, fb.fps, fb.frame_count)
    if seq and every and seq % every == 0:
        return "periodic"
    return None


def chain_start(fb, cfg: CompressorConfig, seq: int | None = None) -> int | None:
    """For a stream that is not live, the first batch of the segment that batch ``seq`` (default:
    this batch) belongs to: the last planned key frame at or before it.  None for a live stream,
    which is one chain (its batches are never coded far apart)."""
    if fb.live:
        return None
    seq = fb.batch_seq if seq is None else seq
    every = keyframe_every(cfg, fb.fps, fb.frame_count)
    starts = [seq - seq % n for n in (cfg.segment_batches, every) if n]
    return max(starts, default=0)


def chain_of(fb, cfg: CompressorConfig) -> tuple[str, bool]:
    """(the key of the chain the batch belongs to, whether it is that chain's last batch: the next
    starts a segment, so no batch will predict from it)."""
    start = chain_start(fb, cfg)
    last = start is not None and chain_start(fb, cfg, fb.batch_seq + 1) == fb.batch_seq + 1
    return chain_key(fb.stream_id, start), last


def choose_reference(fb, handed: Handed, cfg: CompressorConfig, controls: StreamControls | None):
    """(reference, keyframe_reason) for a batch of a chained stream."""
    planned = planned_keyframe(fb, cfg)
    ref = handed.reference
    requested = False
    if controls is not None:
        if ref is not None and ref.since is not None:
            controls.keyframe_served(fb.stream_id, ref.since)  # another worker's key frame answered it
        # A key frame for any reason at or after the requested batch answers the request.
        requested = controls.take_keyframe_request(fb.stream_id, fb.batch_seq)
    if ref is None:
        return None, handed.reason if handed.reason is not None or planned is None else planned
    if requested:
        return None, "requested"
    if (ref.width, ref.height) != (fb.width, fb.height):
        return None, "resolution"
    if planned is not None:
        return None, planned
    return ref, None


def process_batch(data: bytes | FrameBatch, policy: Policy, cfg: CompressorConfig,
                  controls: StreamControls | None = None, handed: Handed | None = None,
                  speed: PresetGovernor | None = None, on_handoff=None) -> Outcome:
    """Validate (``data``: the message, or a batch already validated), code (through the policy and
    the stream's live config), and measure one batch (CPU work; runs in a thread).  ``handed``: for a
    chained stream, what the hand-off found for this batch (its reference, or why there is none);
    ``on_handoff(chain, fb, frame, codec, since)`` is called as soon as the batch is coded, so that
    the stream's next batch can start while this one is measured and published (frame None: nothing
    to chain to).

    Raises SchemaError for invalid input; other exceptions mean the codec failed.
    """
    fb = data if isinstance(data, FrameBatch) else unpack_frame_batch(data, cfg.limits)
    chain, last_of_chain = chain_of(fb, cfg)
    t0 = time.perf_counter()
    lag_s = max(0.0, time.time() - fb.captured_at)
    decision = controls.decide(fb.stream_id) if controls is not None else None
    reference, keyframe_reason = choose_reference(fb, handed, cfg, controls) if handed is not None else (None, None)
    preset = speed.preset(fb.stream_id, fb.live) if speed is not None else None
    coded = policy.code(fb, decision, reference, preset)
    # The reconstruction is exactly what a receiver decodes (tests hold every codec to it).
    payload, decoded = coded.payload, coded.decoded
    t1 = time.perf_counter()
    # Only a native codec's decode is the same on every receiver by the standard, and a chained
    # hybrid's last frame, which is its base layer's; the neural codec's output does not serve as a
    # reference (the next batch says codec_change).
    hands_off = coded.codec in NATIVE_CODECS or (policy.neural is not None and coded.codec == policy.neural.name
                                                 and getattr(policy.neural, "chains", False))
    handoff = decoded[-1] if handed is not None and hands_off else None
    since = fb.batch_seq if reference is None else reference.since
    if on_handoff is not None:
        on_handoff(chain, fb, handoff, coded.codec, since)
    if speed is not None:
        speed.observe(fb.stream_id, t1 - t0, fb.frame_count / fb.fps, fb.live, lag_s)
    sampled = fb.batch_seq % cfg.quality_every == 0
    q = measure_batch(fb.frames, decoded, fb.width, fb.height, cfg.quality_frames if sampled else 0)
    t2 = time.perf_counter()
    if controls is not None and decision is not None:
        controls.observe(fb.stream_id, decision, q.psnr_y, learned=coded.fallback_reason is None,
                         coded_level=coded.level)
    now = time.time()
    duration_s = fb.frame_count / fb.fps
    compressed = CompressedBatch(
        stream_id=fb.stream_id,
        batch_seq=fb.batch_seq,
        codec=coded.codec,
        width=fb.width,
        height=fb.height,
        frame_count=fb.frame_count,
        fps_num=fb.fps_num,
        fps_den=fb.fps_den,
        first_pts=fb.first_pts,
        captured_at=fb.captured_at,
        encoded_at=now,
        worker_id=cfg.worker_id,
        payload=payload,
    )
    metrics = BatchMetrics(
        batch_id=fb.msg_id,
        stream_id=fb.stream_id,
        batch_seq=fb.batch_seq,
        status="ok",
        worker_id=cfg.worker_id,
        completed_at=now,
        codec=coded.codec,
        codec_params=_params_str(read_header(payload)[0].params),
        level=coded.level,
        fallback_reason=coded.fallback_reason,
        reason=coded.detail,
        baseline_bytes=coded.baseline_bytes,
        mode=decision.mode if decision is not None else None,
        budget_kbps=decision.budget_kbps if decision is not None else None,
        keyframe_reason=keyframe_reason,
        frames=fb.frame_count,
        width=fb.width,
        height=fb.height,
        raw_bytes=fb.raw_bytes,
        compressed_bytes=len(payload),
        kbps=len(payload) * 8 / duration_s / 1000,
        psnr_y=q.psnr_y,
        psnr_rgb=q.psnr_rgb,
        ms_ssim=q.ms_ssim,
        ms_ssim_frames=q.ms_ssim_frames,
        encode_ms=(t1 - t0) * 1000,
        quality_ms=(t2 - t1) * 1000,
        captured_at=fb.captured_at,
    )
    return Outcome(metrics, compressed, handoff, since, chain, last_of_chain)


def _params_str(params: dict) -> str:
    # Per-frame sizes and hashes belong to the payload, not to the row; of a chained batch's hand-off
    # the row names the batch it predicts from.
    params = {**params, **({"ref": params["chain"].get("b")} if isinstance(params.get("chain"), dict) else {})}
    return ",".join(f"{k}={v}" for k, v in sorted(params.items()) if k not in ("sizes", "sha256", "chain"))


class WaitingRoom:
    """The batches a worker holds that wait for a reference without a codec slot (at most ``limit``:
    each holds its frames, 11 MB at 720p).  The fetch loop takes no new batch while it is full."""

    def __init__(self, limit: int):
        self.limit, self.count = limit, 0
        self._changed = asyncio.Condition()

    @property
    def full(self) -> bool:
        return self.count >= self.limit

    async def has_room(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: not self.full)

    def enter(self) -> None:
        self.count += 1

    async def leave(self) -> None:
        self.count -= 1
        async with self._changed:
            self._changed.notify_all()


class _Slot:
    """One of a worker's ``concurrency`` codec slots, held by a batch from its fetch to its ack, and
    lent back while the batch waits for a reference (so that waiting batches do not stop the fetching,
    and a batch whose reference has come finds a slot free at once)."""

    def __init__(self, slots: asyncio.Semaphore):
        self.slots, self.held = slots, True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.slots.release()

    @contextlib.asynccontextmanager
    async def lent(self, room: WaitingRoom):
        """Hand the slot back for the body's duration, as one of the ``room``'s batches (a room of
        limit 0: the batch waits holding its slot)."""
        if not room.limit:
            yield
            return
        room.enter()
        self.release()
        try:
            yield
        finally:
            await room.leave()
            await self.slots.acquire()  # cancelled here (shutdown): held stays False, nothing to give back
            self.held = True


class Compressor:
    """A stateless worker on the shared ``compressor`` consumer."""

    def __init__(self, cfg: CompressorConfig):
        self.cfg = replace(cfg, codec=resolve_codec(cfg.codec))
        self.codec = create_codec(self.cfg.codec, **_codec_kwargs(self.cfg))
        if self.cfg.codec in LEARNED_CODECS:
            # Behind a chained hybrid the fallback is the best native coding the stream can get:
            # chained, and reordering inside the batch like the hybrid's own base.
            native = create_codec(resolve_fallback(self.cfg), **_native_kwargs(self.cfg))
            self.policy = Policy(self.codec, native, self.cfg.policy, self.cfg.level)
        else:
            self.policy = Policy(None, self.codec, self.cfg.policy, self.cfg.level, _choice(self.cfg))
        # Chained coding: the worker's own codec can chain (a native one in CHAINABLE, or the hybrid
        # on such a base; the neural codec codes closed GOPs).  The native fallback behind the hybrid
        # chains too where it can.
        self.chained = self.cfg.chain and getattr(self.codec, "chains", False)
        # The preset per stream, from measured encode times (a fixed --preset turns it off); of the
        # hybrid, its base layer's.
        base = getattr(self.codec, "base", self.codec)
        self.speed = PresetGovernor(base.name, self.cfg.preset) if self.chained else None
        self.pool = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="codec")
        self.controls = StreamControls()
        self.bus: Bus | None = None
        self.refs: ReferenceStore | None = None
        self.wedged = False
        self._stop: asyncio.Event | None = None
        self._waiting = WaitingRoom(self.cfg.max_waiting)

    async def run(self, stop: asyncio.Event) -> int:
        """Serve until ``stop`` is set; 0 after a clean drain, :data:`EXIT_WEDGED` after a hung codec."""
        self._stop = stop
        self.bus = await Bus.connect_until(self.cfg.bus, f"aic-compressor-{self.cfg.worker_id}", stop)
        if self.bus is None:
            return 0
        if not await self.bus.prepare_until(COMPRESSOR_STREAMS, stop):
            return 0
        self.refs = ReferenceStore(self.bus, self.cfg.chain_wait_s, self.cfg.batch_timeout_s)
        sub = await self.bus.pull(busmod.FRAMES_STREAM, busmod.COMPRESSOR_CONSUMER)
        watcher = asyncio.create_task(self.watch_exhausted(stop))
        expiry = asyncio.create_task(self.watch_expiring(stop))
        control = asyncio.create_task(self.controls.watch(self.bus, stop))
        lag = asyncio.create_task(self.watch_pending(stop))
        await asyncio.wait([asyncio.ensure_future(self.controls.ready.wait()), control], timeout=5.0,
                           return_when=asyncio.FIRST_COMPLETED)
        log.info("compressor_started", worker_id=self.cfg.worker_id, codec=self.codec.name, chained=self.chained,
                 **self.codec.params)
        slots = asyncio.Semaphore(self.cfg.concurrency)
        tasks: set[asyncio.Task] = set()
        try:
            while not stop.is_set():
                if self._waiting.limit:  # a full waiting room: no new batch until one of them moves on
                    await self._wait_or_stop(self._waiting.has_room(), stop)
                await slots.acquire()
                if stop.is_set():  # set while waiting for a slot: take no new batch
                    slots.release()
                    break
                try:
                    msgs = await sub.fetch(1, timeout=1.0)
                except asyncio.TimeoutError:
                    slots.release()
                    continue
                except Exception as exc:  # server gone: keep trying, the client reconnects
                    slots.release()
                    log.warning("fetch_failed", error=str(exc))
                    await asyncio.sleep(0.5)
                    continue
                slot = _Slot(slots)
                task = asyncio.create_task(self._handle(msgs[0], slot))
                tasks.add(task)
                task.add_done_callback(lambda t, slot=slot: (tasks.discard(t), slot.release()))
        finally:
            if tasks:
                # A wedged pool may never start the batches queued behind the stuck one: those are
                # cancelled unanswered, and JetStream redelivers them to another worker.
                _, late = await asyncio.wait(tasks, timeout=WEDGED_GRACE_S if self.wedged else None)
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)
            await asyncio.gather(watcher, expiry, control, lag, return_exceptions=True)
            self.pool.shutdown(wait=not self.wedged, cancel_futures=True)
            await _unsubscribe(sub)
            await self.bus.close()
            log.info("compressor_stopped", worker_id=self.cfg.worker_id, wedged=self.wedged)
        return EXIT_WEDGED if self.wedged else 0

    @staticmethod
    async def _wait_or_stop(aw, stop: asyncio.Event) -> None:
        done = asyncio.ensure_future(aw)
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([done, stopped], return_when=asyncio.FIRST_COMPLETED)
        for t in (done, stopped):
            t.cancel()

    async def _handle(self, msg: Msg, slot: "_Slot") -> None:
        t0 = time.perf_counter()
        meta = msg.metadata
        attempts = meta.num_delivered or 1
        beat = asyncio.create_task(self._heartbeat(msg))
        on_subject = busmod.stream_of_subject(msg.subject)
        ids = _ids_from_msg_id((msg.headers or {}).get(busmod.MSG_ID_HEADER, ""))
        if ids[0] != on_subject:
            ids = (None, None)  # an id naming another stream than its subject's is not the gateway's
        if ids[0] is not None:
            self.refs.begin(*ids)
        outcome = None
        try:
            dropped = (msg.headers or {}).get(busmod.DROPPED_HEADER)
            if dropped is not None:  # a live batch the gateway could not keep while the bus was away
                await self._give_up(msg, "rejected", f"dropped_at_gateway: {dropped[:200]}", attempts)
                return
            try:
                # The envelope around the frames is small; a claim beyond this is refused unread.
                data = await self.bus.payload(msg, max_size=self.cfg.limits.max_batch_bytes + (1 << 20))
                # Validated off the event loop (a 720p batch is 11 MB), once: the hand-off needs to
                # know whether the batch is live and whether it starts a segment.
                fb = await asyncio.get_running_loop().run_in_executor(None, unpack_frame_batch, data,
                                                                      self.cfg.limits)
                del data
                if fb.stream_id != on_subject:
                    # Permissions bind a gateway to its tenant's subjects, not the bytes it sends: a
                    # batch that names another stream would be coded into that stream.
                    raise SchemaError("bad_field", f"stream_id {fb.stream_id!r} is not the stream of subject "
                                                   f"{msg.subject!r}")
                outcome = await self._code(fb, await self._handed(fb, ids, slot))
            except (SchemaError, ClaimError) as exc:
                code = getattr(exc, "code", "claim_missing")
                await self._give_up(msg, "rejected", f"{code}: {getattr(exc, 'reason', str(exc))}", attempts)
                return
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, asyncio.TimeoutError):
                    error = f"coding took longer than the {self.cfg.batch_timeout_s:g} s batch timeout"
                    self._wedge(msg, error)
                if attempts >= self.cfg.bus.max_deliver:
                    await self._give_up(msg, "failed", error, attempts)
                else:
                    log.warning("batch_retry", subject=msg.subject, attempts=attempts, error=error)
                    await msg.nak(delay=1.0)
                return
            await self._deliver(msg, outcome, attempts)
            BATCH_SECONDS.observe(time.perf_counter() - t0)
        except Exception as exc:
            # Publishing failed (server down, timeout): no ack, so JetStream redelivers.
            log.error("batch_unacked", subject=msg.subject, error=f"{type(exc).__name__}: {exc}")
            if outcome is not None and outcome.chain is not None:
                # The coding receivers get, after the redelivery, may be another.
                self.refs.drop(outcome.chain, outcome.metrics.batch_seq)
        finally:
            beat.cancel()
            if ids[0] is not None:
                self.refs.end(*ids)

    async def _handed(self, fb: FrameBatch, ids: tuple[str | None, int | None], slot: "_Slot") -> Handed | None:
        """For a chained stream, the previous batch's reference (waiting for it a bounded time, on the
        event loop).  ``ids``: the message id's stream and batch, which the batch must match.

        A batch that must wait (its predecessor is still being coded, here or on another worker)
        hands its codec slot back meanwhile, up to ``max_waiting`` such batches: the worker fetches
        on, so that a backlog's next segment, which needs no reference, is coded in parallel.  A batch
        that is not live has no deadline: it waits for its predecessor up to two ack waits (the time
        JetStream takes to give a dead worker's batch to another), not just ``chain_wait_s``."""
        if not self.chained:
            return None
        sid, seq = ids
        if sid is None or (sid, seq) != (fb.stream_id, fb.batch_seq):
            return Handed(None, "no_reference")  # the envelope's id and the batch disagree: trust neither's reference
        planned = planned_keyframe(fb, self.cfg)
        if planned is not None:
            return Handed(None, planned)
        wait_s = None if fb.live else max(self.cfg.chain_wait_s, 2 * self.cfg.bus.ack_wait_s)
        chain = chain_of(fb, self.cfg)[0]
        find = asyncio.ensure_future(self.refs.for_batch(chain, seq, wait_s))
        done, _ = await asyncio.wait([find], timeout=2 * POLL_S)
        if not done:
            async with slot.lent(self._waiting):
                await find
        return find.result()

    async def _code(self, data: bytes | FrameBatch, handed: Handed | None = None) -> Outcome:
        """Run :func:`process_batch` in the pool; the timeout counts from when a thread takes the
        batch, so waiting behind the worker's other batches is not coding time."""
        loop = asyncio.get_running_loop()
        started = asyncio.Event()

        def handoff(chain, fb, frame, codec, since) -> None:
            loop.call_soon_threadsafe(self.refs.remember, chain, fb.batch_seq, fb.width, fb.height, frame, codec,
                                      since)

        def job() -> Outcome:
            loop.call_soon_threadsafe(started.set)
            return process_batch(data, self.policy, self.cfg, self.controls, handed, self.speed,
                                 handoff if handed is not None else None)

        future = loop.run_in_executor(self.pool, job)
        waiter = asyncio.ensure_future(started.wait())
        try:
            await asyncio.wait([future, waiter], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        # The deadline frees the batch (retried, then failed) though not the thread, which a hung
        # codec keeps: the heartbeat would otherwise hold such a batch forever.
        return await asyncio.wait_for(future, self.cfg.batch_timeout_s)

    def _wedge(self, msg: Msg, error: str) -> None:
        """A codec thread is stuck: take no more work, so that a fresh process replaces this one."""
        if not self.wedged:
            log.error("worker_wedged", subject=msg.subject, error=error, exit_status=EXIT_WEDGED)
        self.wedged = True
        if self._stop is not None:
            self._stop.set()

    async def _heartbeat(self, msg: Msg) -> None:
        # Long batches (4K, slow models) must not be redelivered while still in progress.
        while True:
            await asyncio.sleep(max(1.0, self.cfg.bus.ack_wait_s / 3))
            try:
                await msg.in_progress()
            except Exception as exc:  # a reconnect: keep beating, or the batch is redelivered mid-work
                log.warning("heartbeat_failed", subject=msg.subject, error=f"{type(exc).__name__}: {exc}")

    async def _deliver(self, msg: Msg, outcome: Outcome, attempts: int) -> None:
        cb = outcome.compressed
        # varies: another worker may have coded this batch differently before it died.
        packed = cb.pack()
        ack = await self._store(lambda: self.bus.publish(busmod.compressed_subject(cb.stream_id), packed, cb.msg_id,
                                                         kind="compressed", varies=True), cb.msg_id)
        try:
            if self.chained:
                await self._hand_off(outcome, ack, packed)
            else:
                # No reference from this batch: a chained worker that gets the stream's next batch knows
                # at once (codec_change) instead of waiting for one.
                await self.refs.publish(outcome.chain, cb.batch_seq, cb.width, cb.height, None, cb.codec)
        except Exception as exc:  # the payload is out: a lost hand-off costs the next batch a key frame
            log.warning("reference_not_published", batch_id=cb.msg_id, error=f"{type(exc).__name__}: {exc}")
        now = time.time()
        m = outcome.metrics
        row = replace(m, latency_ms=(now - m.captured_at) * 1000, attempts=attempts, completed_at=now)
        await self._store(lambda: self.bus.publish(busmod.metrics_subject(self.cfg.worker_id), row.pack(),
                                                   f"m:{row.batch_id}"), row.batch_id)
        await msg.ack_sync(timeout=10)
        await self.bus.release(msg)
        BATCHES.labels("ok").inc()
        ENCODE_SECONDS.labels(row.codec).observe(row.encode_ms / 1000)
        PSNR_Y.labels(row.codec).observe(row.psnr_y)
        if row.fallback_reason:
            FALLBACKS.labels(row.fallback_reason).inc()
        log.info(
            "batch",
            status="ok",
            batch_id=row.batch_id,
            codec=row.codec,
            rate_level=row.level,  # (not "level": that is the log line's own)
            fallback=row.fallback_reason,
            keyframe=row.keyframe_reason,
            frames=row.frames,
            size=f"{row.width}x{row.height}",
            raw_bytes=row.raw_bytes,
            compressed_bytes=row.compressed_bytes,
            psnr_y=round(row.psnr_y, 3),
            ms_ssim=None if row.ms_ssim is None else round(row.ms_ssim, 5),
            encode_ms=round(row.encode_ms, 1),
            quality_ms=round(row.quality_ms, 1),
            latency_ms=round(row.latency_ms, 1),
            attempts=attempts,
        )

    async def _store(self, publish, batch_id: str):
        """``await publish()``, tried again in place while JetStream has no room for it (the server's
        store full: a disk another process filled), for up to the batch timeout.  The batch stays
        this worker's meanwhile (its heartbeat runs): it is neither coded again nor counted as a
        failed delivery, and goes out once room comes back."""
        t0, delay = time.monotonic(), 0.25
        while True:
            try:
                return await publish()
            except StreamFull as exc:
                waited = time.monotonic() - t0
                if waited >= self.cfg.batch_timeout_s or (self._stop is not None and self._stop.is_set()):
                    raise
                OUTPUTS_FULL.inc()
                log.warning("outputs_full", batch_id=batch_id, error=str(exc), waited_s=round(waited, 1))
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)

    async def _hand_off(self, outcome: Outcome, ack, packed: bytes) -> None:
        """Publish the reference of the payload that receivers get.  After a redelivery JetStream may
        keep an earlier coding of this batch (``duplicate``): its reference is this one only if the
        bytes are the same; otherwise the next batch starts with a key frame rather than drift."""
        cb = outcome.compressed
        frame = outcome.handoff
        if ack.duplicate:
            try:
                stored = await self.bus.js.get_msg(busmod.COMPRESSED_STREAM, ack.seq)
                # (a claim-checked payload is reassembled from its chunks, each checked as its own)
                same = await self.bus.payload(stored, max_size=len(packed)) == packed
            except Exception:
                same = False
            if not same:
                # (A batch of this stream that this worker coded meanwhile from its own copy of the
                # reference will not decode at receivers: they ask for a key frame.  Rare: a
                # redelivered batch is coded again from the same reference, to the same bytes.)
                log.warning("reference_withheld", batch_id=cb.msg_id,
                            reason="the bus kept another coding of this batch")
                frame = None
        if outcome.last_of_chain and frame is not None:
            await self.refs.end_chain(outcome.chain)  # the next batch starts a segment: nobody needs it
            return
        await self.refs.publish(outcome.chain, cb.batch_seq, cb.width, cb.height, frame,
                                cb.codec if frame is not None or not ack.duplicate else "", outcome.since)

    async def _give_up(self, msg: Msg, status: str, reason: str, attempts: int) -> None:
        """Terminate a batch that will never succeed, with a dead letter and a metrics row saying why."""
        await self._report_failure(msg, msg.metadata.sequence.stream, status, reason, attempts)
        await msg.term()
        await self.bus.release(msg)

    async def watch_pending(self, stop: asyncio.Event) -> None:
        """Export the shared consumer's backlog (for the consumer-lag alert)."""
        while not stop.is_set():
            try:
                info = await self.bus.js.consumer_info(busmod.FRAMES_STREAM, busmod.COMPRESSOR_CONSUMER)
                PENDING.set(info.num_pending + info.num_ack_pending)
            except Exception as exc:  # the alert goes stale rather than the worker failing
                log.debug("pending_unknown", error=str(exc))
            await pause(stop, PENDING_EVERY_S)

    async def watch_expiring(self, stop: asyncio.Event) -> None:
        """Give every frame batch about to expire unprocessed its row, then every :data:`EXPIRY_EVERY_S`."""
        while not stop.is_set():
            try:
                await self.expire_old()
            except Exception as exc:  # server trouble: the next round tries again
                log.warning("expiry_check_failed", error=f"{type(exc).__name__}: {exc}")
            await pause(stop, EXPIRY_EVERY_S)

    async def expire_old(self, limit: int = 256) -> int:
        """Frame batches that have waited past the expiry margin (``StoreLimits.expires_after_s``): a
        failed row (reason ``expired``) and a dead letter each, then removed, so that none vanishes
        without a row when the stream's max age takes it.  Any worker may do this: the row and the dead
        letter carry message ids, so two workers at it make one of each.  Returns how many."""
        info = await self.bus.js.stream_info(busmod.FRAMES_STREAM)
        # The stream's own max age (the admin's), not this worker's environment; and only batches no
        # worker has been given yet: one being coded (or waiting for its redelivery) gets its row there.
        max_age = info.config.max_age or self.cfg.bus.store.max_age_s
        lim = replace(self.cfg.bus.store, max_age_s=max_age)
        cutoff = time.time() - lim.expires_after_s
        delivered = (await self.bus.js.consumer_info(busmod.FRAMES_STREAM, busmod.COMPRESSOR_CONSUMER)).delivered
        seq, done = max(info.state.first_seq, (delivered.stream_seq or 0) + 1), 0
        while done < limit and seq <= info.state.last_seq:
            try:
                msg = await self.bus.js.get_msg(busmod.FRAMES_STREAM, seq, subject=busmod.FRAMES_FILTER, next=True)
            except NotFoundError:
                break
            if msg.time is None or msg.time.timestamp() > cutoff:
                break
            waited = time.time() - msg.time.timestamp()
            reason = (f"expired: waited {waited:.0f} s unprocessed; the frames stream keeps a batch "
                      f"{lim.max_age_s:g} s (AIC_RETENTION_S), and no worker reached it in time")
            await self._report_failure(msg, msg.seq, "failed", reason, 0)
            try:
                # (Its claim-checked chunks, if any, are left to the max age, which takes them within
                # the margin: deleting them unread would trust a claim nobody checked.)
                await self.bus.js.delete_msg(busmod.FRAMES_STREAM, msg.seq)
            except NotFoundError:
                pass  # coded or expired meanwhile
            EXPIRED.inc()
            done, seq = done + 1, msg.seq + 1
        return done

    async def watch_exhausted(self, stop: asyncio.Event) -> None:
        """Turn JetStream's max-deliveries advisories into failed rows.

        A batch whose worker dies or hangs on every attempt never reaches ``_give_up``;
        JetStream then announces it.  Any worker may handle the advisory: the row and the
        dead letter carry message ids, so two workers handling it make one of each.
        """
        sub = await self.bus.pull(busmod.ADVISORY_STREAM, busmod.EXHAUSTED_CONSUMER)
        try:
            while not stop.is_set():
                try:
                    msgs = await sub.fetch(8, timeout=1.0)
                except asyncio.TimeoutError:
                    continue
                except Exception as exc:
                    log.warning("fetch_failed", consumer=busmod.EXHAUSTED_CONSUMER, error=str(exc))
                    await asyncio.sleep(0.5)
                    continue
                for adv in msgs:
                    try:
                        await self._handle_exhausted(adv)
                    except Exception as exc:  # server trouble: the advisory is redelivered
                        log.warning("exhausted_unhandled", error=f"{type(exc).__name__}: {exc}")
        finally:
            await _unsubscribe(sub)

    async def _handle_exhausted(self, adv: Msg) -> None:
        try:
            info = json.loads(adv.data)
            stream_seq = int(info["stream_seq"])
            deliveries = int(info.get("deliveries", self.cfg.bus.max_deliver))
        except (ValueError, KeyError, TypeError):
            await adv.term()
            return
        try:
            msg = await self.bus.js.get_msg(busmod.FRAMES_STREAM, stream_seq)
        except NotFoundError:
            await adv.ack()  # answered after all (a late ack) or already failed by a worker
            return
        reason = f"no worker answered in {deliveries} deliveries (crashed or hung every time)"
        await self._report_failure(msg, stream_seq, "failed", reason, deliveries)
        await self.bus.js.delete_msg(busmod.FRAMES_STREAM, stream_seq)
        if (msg.headers or {}).get(busmod.CLAIM_HEADER):
            try:  # its chunks count against the frames bound: checked as its own, then deleted
                await self.bus.payload(msg, max_size=self.cfg.limits.max_batch_bytes + (1 << 20))
                await self.bus.release(msg)
            except (ClaimError, NotFoundError):
                pass  # gone already, or not its own: left to the max age
        await adv.ack()

    async def _report_failure(self, msg, stream_seq: int, status: str, reason: str, attempts: int) -> None:
        """Publish the dead letter and the metrics row of a batch that ends without a payload."""
        if (msg.headers or {}).get(busmod.CLAIM_HEADER) or (msg.headers or {}).get(busmod.DROPPED_HEADER):
            # The frames are elsewhere (or were dropped), but the message id is the gateway's "stream:seq".
            sid, seq = _ids_from_msg_id((msg.headers or {}).get(busmod.MSG_ID_HEADER, ""))
        else:
            sid, seq = peek_ids(msg.data)
        on_subject = busmod.stream_of_subject(msg.subject) or "_invalid"
        if sid != on_subject:  # unreadable, or naming another stream than its subject's: the subject counts
            sid, seq = on_subject, None
        batch_id = f"{sid}:{seq}" if seq is not None else f"{sid}:js{stream_seq}"
        now = time.time()
        row = BatchMetrics(
            batch_id=batch_id,
            stream_id=sid,
            batch_seq=seq,
            status=status,
            reason=reason[:500],
            worker_id=self.cfg.worker_id,
            completed_at=now,
            attempts=attempts,
            # The batch's capture time, as its ``ok`` row has it, or else when JetStream stored it:
            # the same on every delivery, so the row's key (batch id, event time) is too, and a
            # repeated report, or one for a batch that did make its ok row, adds no second row.
            captured_at=_captured_at(msg),
        )
        letter = pack_dead_letter(batch_id, status, row.reason, msg.subject, stream_seq, attempts=attempts,
                                  worker_id=self.cfg.worker_id)
        await self._store(lambda: self.bus.publish(busmod.deadletter_subject(sid), letter, f"dl:{batch_id}"), batch_id)
        await self._store(lambda: self.bus.publish(busmod.metrics_subject(self.cfg.worker_id), row.pack(),
                                                   f"m:{batch_id}"), batch_id)
        BATCHES.labels(status).inc()
        log.warning("batch", status=status, batch_id=batch_id, reason=row.reason, attempts=attempts)


def _captured_at(msg) -> float | None:
    """The gateway's capture time from the message's header, else when JetStream stored it."""
    try:
        t = float((msg.headers or {}).get(busmod.CAPTURED_HEADER, ""))
        if 0.0 <= t <= MAX_TIMESTAMP:
            return t
    except ValueError:
        pass
    return _stored_at(msg)


def _stored_at(msg) -> float | None:
    """When JetStream stored the message: a consumed message's metadata, or a fetched one's time."""
    stored = getattr(msg, "time", None)  # RawStreamMsg (the exhausted-batch path reads it by sequence)
    if stored is not None:
        return stored.timestamp()
    try:
        return msg.metadata.timestamp.timestamp()
    except Exception:  # neither: the row falls back to completion time
        return None


def _ids_from_msg_id(msg_id: str) -> tuple[str | None, int | None]:
    """(stream, batch) of a gateway's message id ``STREAM:SEQ``, or ``STREAM:SEQ#NONCE`` (republished
    because the plain id was taken, services/ingest/gateway.py)."""
    sid, _, seq = msg_id.partition("#")[0].rpartition(":")
    if STREAM_ID_RE.match(sid) and seq.isdigit():
        return sid, int(seq)
    return None, None


#: What ``auto`` codes with, on measurements (docs/benchmarks.md, "Chained batches"): chained x264
#: (tuned for PSNR, reordering inside the batch) needs far fewer bytes than any closed-GOP coding;
#: chained SVT-AV1 needs 11-63 % more at the default operating point; the hybrid on the same chained
#: base equals it within 0.1 point of BD-rate and codes at 1-27 frames/s on a CPU, so it could not
#: keep up with a live stream.
AUTO_CODEC = "x264-psnr"


def resolve_codec(name: str) -> str:
    """``auto`` → :data:`AUTO_CODEC` (logged, never silent); any other name as it is."""
    if name != "auto":
        return name
    learned = [c for c in LEARNED_CODECS if learned_available(c)]
    log.info("codec_auto", chosen=AUTO_CODEC,
             reason="chained x264 measured the fewest bytes; the learned codecs add nothing measurable on it and are slower"
             + (f" ({', '.join(learned)} available with --codec)" if learned else ""))
    return AUTO_CODEC


def _choice(cfg: CompressorConfig) -> CodecChoice | None:
    """The per-stream codec trial ``--try-codec`` asks for (None: none)."""
    if not cfg.try_codec:
        return None
    name, preset = parse_try_codec(cfg.try_codec)
    if name not in NATIVE_CODECS:
        raise ValueError(f"--try-codec {cfg.try_codec!r}: not a native codec ({', '.join(NATIVE_CODECS)})")
    return CodecChoice(create_codec(name, **({"preset": preset} if preset else {}), **_reorder_kwargs(cfg)),
                       cfg.try_every, chained_only=cfg.chain)


def resolve_fallback(cfg: CompressorConfig) -> str:
    """The native codec behind a learned one: ``--fallback``, or for ``auto`` the best native coding
    for the policy's metric, so that "never worse than native" means the best native: x264 tuned for
    PSNR for the PSNR targets, x264's psychovisual tuning for MS-SSIM (docs/rd/chain_rd.txt: closed
    GOPs, BD-rate MS-SSIM +27.7 % for x264 against +64.3 % for x264-psnr; the other way in PSNR)."""
    if cfg.fallback != "auto":
        return cfg.fallback
    return "x264" if cfg.policy.metric == "ms_ssim" else "x264-psnr"


def _codec_kwargs(cfg: CompressorConfig) -> dict:
    if cfg.codec in LEARNED_CODECS:
        kw = {k: v for k, v in (("model", cfg.model), ("level", cfg.level)) if v is not None}
        if cfg.codec == "hybrid" and cfg.chain:
            kw.update(hand_off=True, **_reorder_kwargs(cfg))
        return kw
    return _native_kwargs(cfg)


def _reorder_kwargs(cfg: CompressorConfig) -> dict:
    """Reordering inside the batch, for chained coding (x264 only: other native codecs ignore it)."""
    return {"reorder": True} if cfg.chain and cfg.reorder else {}


def _native_kwargs(cfg: CompressorConfig) -> dict:
    kw = _reorder_kwargs(cfg)
    if cfg.crf is not None:
        kw["crf"] = cfg.crf
    if cfg.preset is not None:
        kw["preset"] = cfg.preset
    return kw
