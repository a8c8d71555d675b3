"""``aic top``: a live terminal view of what the pipeline is doing, per stream.

It reads what any stack exposes to its admin and its database, so it works against ``aic up`` on this
machine and against a deployment alike:

- the bus: the frames stream's backlog per stream (batches waiting, from the stream's per-subject
  counts), its bytes against its bound, the oldest waiting batch, and the shared consumer's batches
  in flight and redelivered; each stream's batch numbering (the ``aic_ingest`` bucket), whose growth
  is the frames coming in;
- the database: the rows completed in the last ``--window`` seconds (frames out, latency p50/p99
  split into coding and waiting, codec and key-frame mix, fallbacks, batches without a payload).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from shared import bus as busmod
from shared.bus import Bus
from shared.config import BusConfig


@dataclass
class StreamView:
    stream_id: str
    backlog: int = 0  # batches waiting on the frames stream (not yet acked)
    numbered: int | None = None  # the stream's next batch number (gateway)
    frames_in_s: float | None = None
    window: dict = field(default_factory=dict)  # services/metrics/queries.py live_window's row


@dataclass
class Snapshot:
    at: float
    window_s: float
    streams: dict[str, StreamView]
    backlog: int = 0
    frames_bytes: int = 0
    frames_bound: int = 0
    oldest_s: float | None = None
    in_flight: int = 0
    redelivered: int = 0
    idle_fetches: int = 0  # pull requests waiting: workers with a free slot
    problems: list[str] = field(default_factory=list)


class Top:
    """Takes :class:`Snapshot` s of one stack; the frames-in rate needs two."""

    def __init__(self, bus_cfg: BusConfig, database_url: str, window_s: float = 30.0, tenant: str | None = None):
        self.bus_cfg, self.database_url, self.window_s, self.tenant = bus_cfg, database_url, window_s, tenant
        self.bus: Bus | None = None
        self._last: Snapshot | None = None

    async def close(self) -> None:
        if self.bus is not None:
            await self.bus.close()

    async def snapshot(self) -> Snapshot:
        snap = Snapshot(time.time(), self.window_s, {})
        await asyncio.gather(self._from_bus(snap), self._from_database(snap))
        if self._last is not None:
            dt = snap.at - self._last.at
            for sid, view in snap.streams.items():
                before = self._last.streams.get(sid)
                if view.numbered is not None and before is not None and before.numbered is not None and dt > 0:
                    per_batch = (view.window.get("frames") or 0) / max(1, view.window.get("ok") or 0) or 8
                    view.frames_in_s = (view.numbered - before.numbered) * per_batch / dt
        self._last = snap
        return snap

    def _view(self, snap: Snapshot, sid: str) -> StreamView:
        return snap.streams.setdefault(sid, StreamView(sid))

    async def _from_bus(self, snap: Snapshot) -> None:
        try:
            if self.bus is None:
                self.bus = await Bus.connect(self.bus_cfg, name="aic-top", wait_s=5.0)
            bus = self.bus
            # The raw API answer: nats-py's StreamState drops the first message's time.
            reply = await bus.nc.request(f"$JS.API.STREAM.INFO.{busmod.FRAMES_STREAM}",
                                         json.dumps({"subjects_filter": busmod.FRAMES_FILTER}).encode(), timeout=5)
            info = json.loads(reply.data)
            if "error" in info:
                raise RuntimeError(info["error"].get("description"))
            state = info["state"]
            snap.frames_bytes, snap.frames_bound = state.get("bytes", 0), info["config"].get("max_bytes", -1)
            for subject, n in (state.get("subjects") or {}).items():
                sid = busmod.stream_of_subject(subject)
                if sid is not None and self._mine(sid):
                    self._view(snap, sid).backlog = n
                    snap.backlog += n
            if state.get("messages"):
                snap.oldest_s = max(0.0, snap.at - _timestamp(state["first_ts"]))
            ci = await bus.js.consumer_info(busmod.FRAMES_STREAM, busmod.COMPRESSOR_CONSUMER)
            snap.in_flight, snap.redelivered = ci.num_ack_pending, ci.num_redelivered
            snap.idle_fetches = ci.num_waiting or 0
            numbers = await bus.ingest_kv()
            for sid in await numbers.stream_ids():
                if not self._mine(sid):
                    continue
                try:
                    entry = await numbers.get(sid)
                    self._view(snap, sid).numbered = int((entry.value or b"0").split()[0])
                except Exception:
                    continue  # deleted meanwhile
        except Exception as exc:
            snap.problems.append(f"bus: {type(exc).__name__}: {exc}")
            if self.bus is not None and self.bus.nc.is_closed:
                self.bus = None

    async def _from_database(self, snap: Snapshot) -> None:
        from services.metrics.queries import live_window

        try:
            conn = await asyncpg.connect(self.database_url, timeout=5)
            try:
                for row in await live_window(conn, self.window_s, self.tenant):
                    self._view(snap, row["stream_id"]).window = row
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
            snap.problems.append(f"database: {type(exc).__name__}: {exc}")

    def _mine(self, sid: str) -> bool:
        return self.tenant is None or sid.split(".", 1)[0] == self.tenant and "." in sid


def _timestamp(text: str) -> float:
    """JetStream's RFC 3339 time (nanoseconds, ``Z``) as a Unix time."""
    whole, _, frac = text.rstrip("Z").partition(".")
    return datetime.fromisoformat(whole + "+00:00").timestamp() + float(f"0.{frac or 0}")


def _ms(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def _mix(d) -> str:
    if not d:
        return "-"
    if isinstance(d, str):
        d = json.loads(d)
    total = sum(d.values())
    return " ".join(f"{k} {100 * n / total:.0f}%" for k, n in sorted(d.items(), key=lambda kv: -kv[1]))


def rows(snap: Snapshot) -> list[dict[str, str]]:
    """The table's rows as text, one per stream (also what tests read)."""
    out = []
    for sid in sorted(snap.streams):
        v = snap.streams[sid]
        w = v.window
        frames_out = (w.get("frames") or 0) / snap.window_s
        ratio = (w.get("raw_bytes") or 0) / w["compressed_bytes"] if w.get("compressed_bytes") else None
        out.append({
            "stream": sid,
            "in f/s": "…" if v.frames_in_s is None else f"{v.frames_in_s:.1f}",
            "out f/s": f"{frames_out:.1f}",
            "backlog": str(v.backlog),
            "latency p50/p99 ms": f"{_ms(w.get('latency_p50_ms'))}/{_ms(w.get('latency_p99_ms'))}",
            "wait p50/p99": f"{_ms(w.get('wait_p50_ms'))}/{_ms(w.get('wait_p99_ms'))}",
            "coding p50/p99": f"{_ms(w.get('coding_p50_ms'))}/{_ms(w.get('coding_p99_ms'))}",
            "raw:coded": "-" if ratio is None else f"{ratio:.0f}:1",
            "codecs": _mix(w.get("codecs")),
            "key frames": _mix(w.get("keyframes")),
            "fallbacks": str(w.get("fallbacks") or 0),
            "no payload": str(w.get("not_ok") or 0),
        })  # fmt: skip
    return out


def headline(snap: Snapshot) -> str:
    bound = "unbounded" if snap.frames_bound in (-1, 0) else f"{100 * snap.frames_bytes / snap.frames_bound:.0f}% of " \
        f"{snap.frames_bound / 2**20:.0f} MiB"
    oldest = "-" if snap.oldest_s is None else f"{snap.oldest_s:.1f} s"
    return (f"frames stream: {snap.backlog} batches waiting ({snap.frames_bytes / 2**20:.1f} MiB, {bound}), oldest {oldest}"
            f"   in flight {snap.in_flight}, redelivered {snap.redelivered}, idle worker fetches {snap.idle_fetches}"
            f"   rows of the last {snap.window_s:g} s")


def render(snap: Snapshot):
    """A rich renderable of the snapshot."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(expand=False, header_style="bold")
    body = rows(snap)
    for col in (body[0].keys() if body else ["stream"]):
        table.add_column(col, justify="left" if col in ("stream", "codecs", "key frames") else "right")
    for r in body:
        table.add_row(*r.values())
    parts = [Text(time.strftime("%H:%M:%S", time.localtime(snap.at)) + "  " + headline(snap)), table]
    parts += [Text(p, style="bold red") for p in snap.problems]
    return Group(*parts)


async def run(top: Top, every_s: float = 2.0, once: bool = False, console=None) -> int:
    """Redraw every ``every_s`` until interrupted; ``once``: print one view (after two samples, for the
    frames-in rate) and return."""
    from rich.console import Console
    from rich.live import Live

    console = console or Console()
    try:
        snap = await top.snapshot()
        if once:
            await asyncio.sleep(every_s)
            snap = await top.snapshot()
            console.print(render(snap))
            return 1 if snap.problems else 0
        with Live(render(snap), console=console, refresh_per_second=4, screen=False) as live:
            while True:
                await asyncio.sleep(every_s)
                live.update(render(await top.snapshot()))
    finally:
        await top.close()
