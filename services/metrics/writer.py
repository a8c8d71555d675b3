"""Metrics records from JetStream into PostgreSQL with COPY, in micro-batches.

Records are acked only after the transaction that holds them commits.  The
insert goes COPY → temporary table → ``INSERT ... ON CONFLICT (batch_id,
time) DO NOTHING`` (``time`` is the batch's capture time, the same on every
delivery), so a redelivered record (worker retry, writer restart, duplicate
publish outside the dedup window) never makes a second row.  While the
database is away the writer holds its micro-batch, keeps the messages alive
with in-progress acks and retries with backoff; JetStream keeps the rest.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import date, datetime, timezone

import asyncpg
from nats.aio.msg import Msg
from prometheus_client import Counter

from shared import bus as busmod
from shared.bus import Bus, unsubscribe as _unsubscribe
from shared.config import MetricsConfig
from shared.logs import get_logger
from shared.schemas import BatchMetrics, pack_dead_letter, peek_ids, unpack_batch_metrics
from services.metrics.migrations import maintain_partitions, migrate, refresh_rollups

log = get_logger("metrics")

ROWS = Counter("aic_metrics_rows_total", "Metrics records committed (including duplicates ignored)")
INVALID = Counter("aic_metrics_invalid_total", "Metrics records that failed validation")
DB_ERRORS = Counter("aic_metrics_db_errors_total", "Failed database writes")
LOST_CHECK_EVERY_S = 5.0
LOST = Counter("aic_metrics_records_lost_total", "Metrics records the metrics stream dropped (its bound, oldest "
               "first) before this service read them: rows that will never be written")

COLUMNS = (
    "batch_id", "stream_id", "batch_seq", "status", "reason", "worker_id", "codec", "codec_params",
    "frames", "width", "height", "raw_bytes", "compressed_bytes", "kbps", "psnr_y", "psnr_rgb",
    "ms_ssim", "ms_ssim_frames", "encode_ms", "quality_ms", "latency_ms", "attempts",
    "captured_at", "completed_at", "level", "fallback_reason", "baseline_bytes", "mode", "budget_kbps", "keyframe_reason", "extra",
    "time",
)  # fmt: skip
_TS = {"captured_at", "completed_at"}
_INSERT_SQL = (
    f"INSERT INTO batch_metrics ({', '.join(COLUMNS)}) "
    f"SELECT {', '.join(c + '::jsonb' if c == 'extra' else c for c in COLUMNS)} FROM batch_metrics_in "
    "ON CONFLICT (batch_id, time) DO NOTHING"
)
# The minutes these rows fall in need their rollups recomputed (services/metrics/migrations.py, v4).
_DIRTY_SQL = ("INSERT INTO rollup_dirty SELECT DISTINCT date_trunc('minute', time) FROM batch_metrics_in "
              "ON CONFLICT DO NOTHING")
MAINTENANCE_EVERY_S = 3600.0
ROLLUP_EVERY_S = 5.0
# An outage (retry and hold the records), as opposed to a record the database refuses.  Operator
# intervention (57P01 admin shutdown, 57P03 cannot connect now, ...) is what a restart looks like.
_CONNECTION_ERRORS = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
)
# SQLSTATE classes that blame the record itself: 22 data exception, 23 integrity constraint.  Anything
# else (disk full, out of memory, too many connections, read-only after a failover, deadlock,
# serialization failure, lock timeout, a missing relation) is the database's state: hold and retry,
# never drop.
_RECORD_ERROR_CLASSES = ("22", "23")
_WRITE_FAILURES = (*_CONNECTION_ERRORS, asyncpg.PostgresError)


def is_outage(exc: BaseException) -> bool:
    """Whether a write failure should hold the records and retry (True) or isolate a bad record."""
    if isinstance(exc, _CONNECTION_ERRORS):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return str(getattr(exc, "sqlstate", "") or "")[:2] not in _RECORD_ERROR_CLASSES
    return False


def to_record(m: BatchMetrics) -> tuple:
    """A row for COPY.  ``time``, the partition key, is the batch's capture time (the same on every
    delivery of the batch, so a repeat lands on the same key), or its completion time if unknown."""
    out = []
    for c in COLUMNS:
        if c == "time":
            v = datetime.fromtimestamp(m.captured_at if m.captured_at is not None else m.completed_at, timezone.utc)
        else:
            v = getattr(m, c)
        if c in _TS and v is not None:
            v = datetime.fromtimestamp(v, timezone.utc)
        elif c == "extra":
            v = json.dumps(v)
        out.append(v)
    return tuple(out)


_TIME = COLUMNS.index("time")


class RowStore:
    """One connection, the COPY fast path, reconnects on demand."""

    def __init__(self, url: str):
        self.url = url
        self.conn: asyncpg.Connection | None = None
        self.partitions: set[date] = set()  # days known to have a partition

    async def connect(self) -> asyncpg.Connection:
        if self.conn is None or self.conn.is_closed():
            self.conn = await asyncpg.connect(self.url, timeout=5)
            await migrate(self.conn)
            # Staging table for COPY; jsonb has no binary COPY encoder in asyncpg, so extra travels as text.
            await self.conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS batch_metrics_in (LIKE batch_metrics INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;"
                "ALTER TABLE batch_metrics_in ALTER COLUMN extra TYPE text"
            )
        return self.conn

    async def write(self, records: list[tuple]) -> int:
        """Insert records idempotently; returns rows actually inserted."""
        conn = await self.connect()
        for attempt in (0, 1):
            days = {r[_TIME].date() for r in records} - self.partitions
            for day in sorted(days):
                await conn.fetchval("SELECT aic_ensure_partition($1)", day)
            self.partitions |= days
            try:
                async with conn.transaction():
                    await conn.copy_records_to_table("batch_metrics_in", records=records, columns=COLUMNS)
                    status = await conn.execute(_INSERT_SQL)
                    await conn.execute(_DIRTY_SQL)
                return int(status.rsplit(" ", 1)[-1])
            except asyncpg.CheckViolationError as exc:
                # Another process dropped a partition we remembered (retention): forget and retry once.
                if attempt or "no partition" not in str(exc):
                    raise
                self.partitions.clear()
        raise AssertionError("unreachable")

    async def maintain(self, ahead_days: int, retention_days: int) -> tuple[int, int]:
        """Partitions ahead of time, and retention (see :func:`maintain_partitions`)."""
        created, dropped = await maintain_partitions(await self.connect(), ahead_days, retention_days)
        if dropped:
            self.partitions.clear()
        return created, dropped

    async def close(self) -> None:
        if self.conn is not None and not self.conn.is_closed():
            await self.conn.close()


class MetricsWriter:
    def __init__(self, cfg: MetricsConfig):
        self.cfg = cfg
        self.store = RowStore(cfg.database_url)
        self.inserted = 0
        self.lost = 0
        self.bus: Bus | None = None
        self._counted_to = 0  # stream sequences up to this one are counted as lost already

    async def run(self, stop: asyncio.Event) -> int:
        bus = self.bus = await Bus.connect_until(self.cfg.bus, "aic-metrics", stop)
        if bus is None:
            return 0
        if not await bus.prepare_until((busmod.METRICS_STREAM, busmod.DEADLETTER_STREAM), stop):
            return 0
        sub = await bus.pull(busmod.METRICS_STREAM, busmod.METRICS_CONSUMER)
        await self._connect_until_ready(stop)
        log.info("metrics_started")
        next_upkeep = next_rollup = next_lost_check = 0.0
        try:
            while not stop.is_set():
                if time.monotonic() >= next_upkeep:
                    next_upkeep = time.monotonic() + MAINTENANCE_EVERY_S
                    await self._upkeep()
                if time.monotonic() >= next_rollup:
                    next_rollup = time.monotonic() + ROLLUP_EVERY_S
                    await self._refresh_rollups()
                if time.monotonic() >= next_lost_check:
                    next_lost_check = time.monotonic() + LOST_CHECK_EVERY_S
                    await self._count_lost()
                try:
                    msgs = await sub.fetch(self.cfg.max_rows, timeout=self.cfg.flush_interval_s)
                except asyncio.TimeoutError:
                    continue
                except Exception as exc:
                    log.warning("fetch_failed", error=str(exc))
                    await asyncio.sleep(0.5)
                    continue
                await self._flush(msgs, stop)
        finally:
            await self.store.close()
            await _unsubscribe(sub)
            await bus.close()
            log.info("metrics_stopped", inserted=self.inserted)
        return 0

    async def _count_lost(self) -> None:
        """Never silent: records the metrics stream dropped for its bound (a metrics service away for
        long, docs/reliability.md) before any writer read them.  The shared consumer has delivered
        every record up to ``delivered``; a stream whose first record is past it has dropped the ones
        between.  Counted once per process (a high-water mark); every writer of a fleet sees the
        same gap, so its log line says which records."""
        try:
            ci = await self.bus.js.consumer_info(busmod.METRICS_STREAM, busmod.METRICS_CONSUMER)
            first = (await self.bus.js.stream_info(busmod.METRICS_STREAM)).state.first_seq
        except Exception:
            return  # the bus is away: next time
        floor = max(ci.delivered.stream_seq or 0, self._counted_to)
        if first > floor + 1:
            gone = first - floor - 1
            LOST.inc(gone)
            self.lost += gone
            log.error("metrics_records_lost", records=gone, stream_seqs=f"{floor + 1}-{first - 1}",
                      why="the metrics stream dropped them for its bound before they were read "
                          "(AIC_OUTPUTS_MAX_BYTES; the metrics service was away too long)")
            self._counted_to = first - 1

    async def _refresh_rollups(self) -> None:
        try:
            minutes = await refresh_rollups(await self.store.connect())
            if minutes:
                log.info("rollups_refreshed", minutes=minutes)
        except _WRITE_FAILURES as exc:  # the dirty marks stay: next time
            if isinstance(exc, _CONNECTION_ERRORS):
                self.store.conn = None
            log.warning("rollup_refresh_failed", error=f"{type(exc).__name__}: {exc}")

    async def _upkeep(self) -> None:
        try:
            created, dropped = await self.store.maintain(self.cfg.partitions_ahead, self.cfg.retention_days)
            log.info("partitions", created=created, dropped=dropped, retention_days=self.cfg.retention_days)
        except _WRITE_FAILURES as exc:  # retried at the next upkeep
            DB_ERRORS.inc()
            log.warning("partition_upkeep_failed", error=f"{type(exc).__name__}: {exc}")

    async def _connect_until_ready(self, stop: asyncio.Event) -> None:
        delay = 0.2
        while not stop.is_set():
            try:
                await self.store.connect()
                return
            except _CONNECTION_ERRORS as exc:
                log.warning("db_unavailable", error=f"{type(exc).__name__}: {exc}", retry_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _flush(self, msgs: list[Msg], stop: asyncio.Event) -> None:
        good: list[tuple[Msg, tuple]] = []
        for m in msgs:
            try:
                good.append((m, to_record(unpack_batch_metrics(m.data))))
            except Exception as exc:  # SchemaError, or a value no row can hold: never a crash loop
                INVALID.inc()
                reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
                log.warning("invalid_record", subject=m.subject, reason=reason)
                await self._dead_letter(m, "invalid_metrics", reason)
        if not good:
            return
        t0 = time.perf_counter()
        delay = 0.2
        isolate = False
        while True:
            try:
                if isolate:
                    inserted = await self._write_one_by_one(good)
                else:
                    inserted = await self.store.write([r for _, r in good])
                break
            except _WRITE_FAILURES as exc:
                if not is_outage(exc):
                    # A record the database refuses (not an outage): isolate it, keep the rest.
                    # The one-by-one pass stays inside this loop, so an outage during it is retried too.
                    DB_ERRORS.inc()
                    log.error("db_write_failed", error=f"{type(exc).__name__}: {exc}", rows=len(good))
                    isolate = True
                    continue
                DB_ERRORS.inc()
                log.warning("db_unavailable", error=f"{type(exc).__name__}: {exc}", held=len(good), retry_s=delay)
                if isinstance(exc, _CONNECTION_ERRORS):
                    self.store.conn = None
                if stop.is_set():  # shutting down: unacked, so JetStream redelivers them to the next writer
                    return
                await asyncio.gather(*(m.in_progress() for m, _ in good), return_exceptions=True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        for m, _ in good:
            await m.ack()
        self.inserted += inserted
        ROWS.inc(len(good))
        log.info("rows_committed", records=len(good), inserted=inserted, ms=round((time.perf_counter() - t0) * 1000, 1))

    async def _write_one_by_one(self, good: list[tuple[Msg, tuple]]) -> int:
        inserted = 0
        for m, rec in list(good):
            try:
                inserted += await self.store.write([rec])
            except _WRITE_FAILURES as exc:
                if is_outage(exc):
                    raise  # not this record's fault: the caller waits and retries
                log.error("record_refused", batch_id=rec[0], error=f"{type(exc).__name__}: {exc}")
                await self._dead_letter(m, "refused_metrics", f"{type(exc).__name__}: {exc}")
                good.remove((m, rec))
        return inserted

    async def _dead_letter(self, m: Msg, status: str, reason: str) -> None:
        """Keep a record no row takes, as it came, on ``aic.deadletter.<stream>`` (a record from a newer
        schema can be replayed once this writer is upgraded), then drop it from the metrics stream.
        Metrics records hold no frame content."""
        sid, seq = peek_ids(m.data)
        sid = sid or "_invalid"
        stream_seq = m.metadata.sequence.stream
        letter = pack_dead_letter(f"{sid}:{seq}" if seq is not None else None, status, reason, m.subject, stream_seq,
                                  record=bytes(m.data))
        try:
            await self.bus.publish(busmod.deadletter_subject(sid), letter, f"dlm:{stream_seq}")
        except Exception as exc:  # not kept yet: leave the record for redelivery
            log.warning("dead_letter_unpublished", subject=m.subject, error=f"{type(exc).__name__}: {exc}")
            await m.nak(delay=1.0)
            return
        await m.term()
