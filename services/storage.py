"""Keeping an embedded JetStream store off a full disk, and healing it when the disk filled anyway.

The streams' own bounds (:class:`~shared.config.StoreLimits`, sized by ``aic up`` to the free disk at
start) keep aic from filling the disk itself.  Another process can still fill it later; nats-server
then fails the write ("critical write error"), answers no publish on that stream, and stays so after
the space comes back, until it restarts (measured with nats-server 2.15 on a full tmpfs).  Two
things prevent and repair that:

- the frames stream's bound follows the disk: while the free space could not hold what the streams
  may still grow by, the bound is lowered to what fits (never below what the stream holds: lowering
  it further would make JetStream delete unprocessed batches), so gateways meet a full frames stream,
  which is backpressure they wait out, before the disk is full; it goes back up as space returns;
- a store write that failed anyway (seen in the server's log) restarts nats-server, on the same
  address and store, once the disk has room again; publishers retry with the same message ids, so
  nothing is lost or doubled.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

from shared.aio import run_blocking
from shared.config import BusConfig, StoreLimits
from shared.embedded import NatsServer, ServerError
from shared.logs import get_logger

log = get_logger("storage")

#: What nats-server logs when a store write fails on a full disk.
WRITE_FAILED = ("critical write error", "no space left on device")
#: Disk space kept free beyond what the outputs may still grow by (the KV buckets, the server's own files).
RESERVE = 8 << 20
#: Free space the disk needs again before a server whose store write failed is restarted.
RESTART_ROOM = 32 << 20


def store_held(store_dir: Path) -> int:
    """Bytes the JetStream store under ``store_dir`` holds on disk (a few files per stream: cheap)."""
    return sum(f.stat().st_size for f in store_dir.rglob("*") if f.is_file()) if store_dir.exists() else 0


def disk_room(store_dir: Path) -> int:
    """What the disk can give the store: its free space plus what the store holds already."""
    where = store_dir
    while not where.exists():  # (a store not made yet: the disk it will be on)
        where = where.parent
    return shutil.disk_usage(where).free + store_held(store_dir)


class StoreGuard:
    """Watches the disk under an embedded nats-server's store; :meth:`check` as often as wanted."""

    def __init__(self, server: NatsServer, limits: StoreLimits, admin: BusConfig, every_s: float = 2.0,
                 on_restart=None):
        self.server, self.limits, self.admin, self.every_s = server, limits, admin, every_s
        self.on_restart = on_restart
        self.frames_bound = limits.frames_bytes  # as the topology has it now
        self.write_failed = False
        self.restarts = 0
        self._next = 0.0
        self._log_offset = self._log_size()

    def check(self, now: float | None = None) -> None:
        """Look at the disk and the server's log (at most every ``every_s``), and act.  Call it from a
        thread that lives as long as the server: a restarted server gets its death signal when the
        thread that started it ends (PR_SET_PDEATHSIG)."""
        now = time.monotonic() if now is None else now
        if now < self._next:
            return
        self._next = now + self.every_s
        free = shutil.disk_usage(self.server.root).free
        if self._write_failed_since_last_check():
            self.write_failed = True
            log.error("store_write_failed", free_bytes=free,
                      action=f"nats-server restarts once {RESTART_ROOM >> 20} MiB are free")
        if self.write_failed:
            if free >= RESTART_ROOM:
                self._restart(free)
            return
        try:
            self._follow_disk(free, disk_room(self.server.root / "jetstream"))
        except Exception as exc:  # the server restarting, say: next time
            log.warning("store_check_failed", error=f"{type(exc).__name__}: {exc}")

    def _follow_disk(self, free: int, room: int) -> None:
        if room >= self.limits.store_bytes and self.frames_bound == self.limits.frames_bytes:
            return  # the disk holds the streams full: nothing to ask the server (no connection)
        bound = run_blocking(self._apply(free))
        if bound != self.frames_bound:
            log.warning("frames_bound_follows_disk", frames_bound_bytes=bound, free_bytes=free,
                        configured_bytes=self.limits.frames_bytes)
            self.frames_bound = bound

    async def _apply(self, free: int) -> int:
        from nats.js import api as jsapi

        from shared.bus import FRAMES_STREAM, OUTPUT_SHARES, Bus

        bus = await Bus.connect(self.admin, name="aic-store-guard", wait_s=3.0)
        try:
            outputs = 0
            for name in OUTPUT_SHARES:
                outputs += (await bus.js.stream_info(name)).state.bytes
            info = await bus.js.stream_info(FRAMES_STREAM)
            held = info.state.bytes
            # What the outputs may still grow by comes first: they must always be storable.
            growth = 0.9 * free - max(0, self.limits.outputs_bytes - outputs) - RESERVE
            bound = int(min(self.limits.frames_bytes, max(held + growth, held, 1 << 20)))
            # Small moves are not worth a stream update; a move up to the configured bound always is.
            if abs(bound - info.config.max_bytes) > max(1 << 20, info.config.max_bytes // 50) or \
                    (bound == self.limits.frames_bytes != info.config.max_bytes):
                await bus.js.update_stream(replace(info.config, max_bytes=bound, discard=jsapi.DiscardPolicy.NEW))
                return bound
            return info.config.max_bytes
        finally:
            await bus.close()

    def _restart(self, free: int) -> None:
        log.warning("store_restarting_server", reason="a store write failed on a full disk; the space is back",
                    free_bytes=free)
        self.server.stop()
        try:
            self.server.start()
        except (ServerError, OSError) as exc:
            log.error("restart_failed", process="nats", error=str(exc))
            return
        self.restarts += 1
        self.write_failed = False
        if self.on_restart is not None:
            try:
                self.on_restart()  # (the topology: a memory stream does not outlive the server)
            except Exception as exc:  # the services say what is missing; the supervisor goes on
                log.error("topology_not_restored", error=f"{type(exc).__name__}: {exc}")
        self._log_offset = self._log_size()

    def _log_size(self) -> int:
        try:
            return (self.server.root / "nats-server.log").stat().st_size
        except FileNotFoundError:
            return 0

    def _write_failed_since_last_check(self) -> bool:
        path = self.server.root / "nats-server.log"
        try:
            if path.stat().st_size < self._log_offset:
                self._log_offset = 0  # a new log
            with open(path, "rb") as f:
                f.seek(self._log_offset)
                text = f.read().decode(errors="replace").lower()
                self._log_offset = f.tell()
        except FileNotFoundError:
            return False
        return any(w in text for w in WRITE_FAILED)
