"""Live per-stream control in the worker: the config bucket, watched, and each stream's level.

A task keeps the latest :class:`~shared.control.StreamConfig` of every stream
from the KV bucket (a change applies to the stream's next batch).  Per stream,
the level the learned codec uses moves one step per batch inside the mode's
range (see :mod:`shared.control`).  All of it is soft state: a new worker reads
the bucket at start and begins each stream at the middle of its range.  A
stream with no record runs on the worker's flags (``--target``, ``--level``,
whose defaults are the adaptive mode's target and the codec's default level).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass

from shared import bus as busmod
from shared.aio import pause
from shared.control import (
    CONTROL_PREFIX, ESTIMATE_FRESH_S, KEYFRAME_PREFIX, LEVEL_DOWN_MARGIN_DB, ConfigError, StreamConfig,
)
from shared.logs import get_logger
from shared.schemas import stream_of_key

log = get_logger("compressor")


#: Pending key-frame requests a worker keeps (any bus client may ask for any stream id).
MAX_KEYFRAME_REQUESTS = 4096


@dataclass(frozen=True)
class Decision:
    """How to code one batch of a stream."""

    mode: str | None  # None: the stream has no config record (the worker's flags apply)
    target: float | None  # PSNR-Y dB for the learned path; None: mode off, or the worker's flags
    level: int | None
    budget_kbps: float | None = None  # the batch must fit this bitrate


class StreamControls:
    def __init__(self):
        self.configs: dict[str, StreamConfig] = {}
        self.estimates: dict[str, tuple[float, float]] = {}  # stream -> (kbps, monotonic time received)
        self._levels: dict[str, int] = {}
        self._keyframes: dict[str, int] = {}  # stream -> the batch from which a receiver wants a key frame
        self._lock = threading.Lock()  # decide/observe run in the codec threads, updates on the loop
        self.ready = asyncio.Event()

    def config(self, stream_id: str) -> StreamConfig:
        return self.configs.get(stream_id) or StreamConfig()

    def budget(self, stream_id: str) -> float | None:
        """The tighter of the configured budget and a fresh receiver estimate, if any."""
        cfg = self.configs.get(stream_id)
        limits = [cfg.budget_kbps] if cfg is not None and cfg.budget_kbps else []
        est = self.estimates.get(stream_id)
        if est is not None and time.monotonic() - est[1] < ESTIMATE_FRESH_S:
            limits.append(est[0])
        return min(limits) if limits else None

    def decide(self, stream_id: str) -> Decision | None:
        """The stream's mode, target, level and budget for its next batch; None for a stream with
        neither a record nor a budget, which runs on the worker's own flags (``--target``, ``--level``)."""
        cfg = self.configs.get(stream_id)
        budget = self.budget(stream_id)
        if cfg is None:
            return None if budget is None else Decision(None, None, None, budget)
        eff = cfg.effective
        with self._lock:
            level = self._levels.get(stream_id, (eff.level_min + eff.level_max + 1) // 2)
            low = 0 if budget else eff.level_min  # a budget may hold the level below the mode's range
            level = min(max(level, low), eff.level_max)  # the range may have changed
            self._levels[stream_id] = level
        return Decision(cfg.mode, eff.target, level, budget)

    def observe(self, stream_id: str, decision: Decision, psnr_y: float, learned: bool,
                coded_level: int | None = None) -> None:
        """Step the stream's level after a batch: to where a budget pushed it, else up if it missed
        the target and down if it beat it widely."""
        if decision.target is None or decision.level is None:
            return
        eff = self.config(stream_id).effective
        if learned and coded_level is not None and coded_level < decision.level:
            nxt = coded_level  # the budget held this batch lower: start the next one there
        elif not learned or psnr_y < decision.target:
            nxt = decision.level + 1
        elif psnr_y > decision.target + LEVEL_DOWN_MARGIN_DB:
            nxt = decision.level - 1
        else:
            nxt = decision.level
        low = 0 if decision.budget_kbps else eff.level_min  # a budget may go below the mode's range
        with self._lock:
            self._levels[stream_id] = min(max(nxt, low), eff.level_max)

    def apply(self, key: str, value: bytes | None) -> None:
        if not value:
            self.configs.pop(key, None)
            log.info("stream_config", stream_id=key, config="default")
            return
        try:
            cfg = StreamConfig.from_json(value)
        except ConfigError as exc:  # a bad record must not stop the watcher; the stream keeps its last config
            log.warning("stream_config_invalid", stream_id=key, error=str(exc))
            return
        self.configs[key] = cfg
        log.info("stream_config", stream_id=key, config=cfg.to_json().decode())

    def estimate(self, stream_id: str, data: bytes, age_s: float = 0.0) -> None:
        """A receiver's or gateway's bandwidth estimate: JSON ``{"kbps": 300}``, published
        ``age_s`` seconds ago."""
        try:
            kbps = float(json.loads(data)["kbps"])
            if not 1.0 <= kbps <= 1e6:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            log.warning("bandwidth_estimate_invalid", stream_id=stream_id)
            return
        self.estimates[stream_id] = (kbps, time.monotonic() - max(0.0, age_s))

    def request_keyframe(self, stream_id: str, data: bytes) -> None:
        """A receiver's key-frame request: JSON ``{"from_batch": N}``."""
        try:
            from_batch = int(json.loads(data)["from_batch"])
            if not 0 <= from_batch < 2**62:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            log.warning("keyframe_request_invalid", stream_id=stream_id)
            return
        with self._lock:
            if from_batch >= self._keyframes.get(stream_id, -1):
                self._keyframes[stream_id] = from_batch
            while len(self._keyframes) > MAX_KEYFRAME_REQUESTS:  # requests for streams that never came
                self._keyframes.pop(next(iter(self._keyframes)))
        log.info("keyframe_requested", stream_id=stream_id, from_batch=from_batch)

    def keyframe_served(self, stream_id: str, since: int) -> None:
        """The stream's chain began again with a real key frame at batch ``since`` (coded by any
        worker): a pending request from that batch or before is served, and is dropped here too, so
        that each worker holding it does not answer it with a key frame of its own."""
        with self._lock:
            want = self._keyframes.get(stream_id)
            if want is not None and want <= since:
                del self._keyframes[stream_id]

    def take_keyframe_request(self, stream_id: str, batch: int) -> bool:
        """Whether ``batch`` answers a pending request (it is then served: the next batches chain)."""
        with self._lock:
            want = self._keyframes.get(stream_id)
            if want is None or batch < want:
                return False
            del self._keyframes[stream_id]
            return True

    async def watch(self, bus, stop: asyncio.Event) -> None:
        """Follow the config bucket and the bandwidth estimates until ``stop``; a failure (the bucket
        unreachable, a watcher that breaks) is logged and the watch starts again, so a worker never
        runs on without live config unnoticed."""
        delay = 0.5
        while not stop.is_set():
            try:
                await self._watch(bus, stop)
                return
            except Exception as exc:
                log.warning("stream_config_watch_failed", error=f"{type(exc).__name__}: {exc}", retry_s=delay)
                await pause(stop, delay)
                delay = min(delay * 2, 10.0)

    async def _watch(self, bus, stop: asyncio.Event) -> None:
        async def on_estimate(msg):
            sid = busmod.stream_of_subject(msg.subject)
            if sid is not None:
                self.estimate(sid, msg.data)

        async def on_keyframe(msg):
            sid = busmod.stream_of_subject(msg.subject)
            if sid is not None:
                self.request_keyframe(sid, msg.data)

        subs = [await bus.nc.subscribe(f"{prefix}.*.*", cb=cb)  # <tenant>.<name> (shared/schemas.py)
                for prefix, cb in ((CONTROL_PREFIX, on_estimate), (KEYFRAME_PREFIX, on_keyframe))]
        try:
            await self._load_retained_estimates(bus)
            await self._watch_kv(bus, stop)
        finally:
            for s in subs:
                await s.unsubscribe()

    async def _load_retained_estimates(self, bus) -> None:
        """The latest estimate of every stream that has one in the last 30 s (the bus keeps them),
        read after subscribing so that nothing published in between is missed."""
        try:
            info = await bus.js.stream_info(busmod.CONTROL_STREAM, subjects_filter=f"{CONTROL_PREFIX}.>")
            subjects = list((info.state.subjects or {}).keys())
            for subject in subjects:
                sid = busmod.stream_of_subject(subject)
                if sid is None or sid in self.estimates:  # a live one already arrived
                    continue
                msg = await bus.js.get_last_msg(busmod.CONTROL_STREAM, subject, direct=True)
                age = time.time() - msg.time.timestamp() if msg.time else 0.0
                self.estimate(sid, msg.data, age_s=age)
        except Exception as exc:  # soft state: live estimates still arrive
            log.warning("retained_estimates_unavailable", error=f"{type(exc).__name__}: {exc}")
            return
        log.info("retained_estimates", streams=len(subjects))

    async def _watch_kv(self, bus, stop: asyncio.Event) -> None:
        kv = await bus.config_kv()
        watcher = await kv.watchall()
        try:
            while not stop.is_set():
                try:
                    entry = await watcher.updates(timeout=1.0)
                except Exception:  # nats TimeoutError: no change this second
                    continue
                if entry is None:  # the initial values have all arrived
                    self.ready.set()
                    continue
                self.apply(stream_of_key(entry.key), None if entry.operation in ("DEL", "PURGE") else entry.value)
        finally:
            self.ready.set()
            await watcher.stop()
