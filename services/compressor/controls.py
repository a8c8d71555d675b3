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
import threading
from dataclasses import dataclass

from shared.control import LEVEL_DOWN_MARGIN_DB, ConfigError, StreamConfig
from shared.logs import get_logger

log = get_logger("compressor")


@dataclass(frozen=True)
class Decision:
    """How to code one batch of a stream."""

    mode: str
    target: float | None  # PSNR-Y dB for the learned path; None: mode off
    level: int


class StreamControls:
    def __init__(self):
        self.configs: dict[str, StreamConfig] = {}
        self._levels: dict[str, int] = {}
        self._lock = threading.Lock()  # decide/observe run in the codec threads, updates on the loop
        self.ready = asyncio.Event()

    def config(self, stream_id: str) -> StreamConfig:
        return self.configs.get(stream_id) or StreamConfig()

    def decide(self, stream_id: str) -> Decision | None:
        """The stream's mode, target and level for its next batch; None for a stream with no
        record, which runs on the worker's own flags (``--target``, ``--level``)."""
        cfg = self.configs.get(stream_id)
        if cfg is None:
            return None
        eff = cfg.effective
        with self._lock:
            level = self._levels.get(stream_id, (eff.level_min + eff.level_max + 1) // 2)
            level = min(max(level, eff.level_min), eff.level_max)  # the range may have changed
            self._levels[stream_id] = level
        return Decision(cfg.mode, eff.target, level)

    def observe(self, stream_id: str, decision: Decision, psnr_y: float, learned: bool) -> None:
        """Step the stream's level after a batch: up if it missed the target, down if it beat it widely."""
        if decision.target is None:
            return
        eff = self.config(stream_id).effective
        step = 0
        if not learned or psnr_y < decision.target:
            step = 1
        elif psnr_y > decision.target + LEVEL_DOWN_MARGIN_DB:
            step = -1
        with self._lock:
            self._levels[stream_id] = min(max(decision.level + step, eff.level_min), eff.level_max)

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

    async def watch(self, bus, stop: asyncio.Event) -> None:
        """Follow the config bucket until ``stop``; reconnects are the client's business."""
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
                self.apply(entry.key, None if entry.operation in ("DEL", "PURGE") else entry.value)
        finally:
            self.ready.set()
            await watcher.stop()
