"""The metrics schema: day partitions on event time, idempotent on batch id, created ahead, dropped after retention."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from datetime import date, datetime, timedelta, timezone

import asyncpg
import pytest

from services.metrics.migrations import MIGRATIONS, maintain_partitions, migrate
from services.metrics.writer import RowStore, to_record
from shared.schemas import BatchMetrics

DAY = 86400.0


@pytest.fixture
async def db_url(postgres):
    """A fresh, empty database on the session's embedded server."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(postgres.url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    yield postgres.url.rsplit("/", 1)[0] + f"/{name}"


def row(batch: str, captured_at: float, completed_at: float | None = None, **kw) -> BatchMetrics:
    return BatchMetrics(f"s:{batch}", "s", "ok", "w", completed_at or captured_at + 1, batch_seq=int(batch),
                        captured_at=captured_at, frames=8, compressed_bytes=1000, psnr_y=40.0, **kw)


async def partitions(conn) -> list[str]:
    return [r["relname"] for r in await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'batch_metrics' ORDER BY 1")]


async def test_the_table_is_partitioned_by_day_with_brin_on_time_and_btree_on_stream_time(db_url):
    conn = await asyncpg.connect(db_url)
    try:
        await migrate(conn)
        assert await conn.fetchval(
            "SELECT partstrat::text FROM pg_partitioned_table WHERE partrelid = 'batch_metrics'::regclass") == "r"
        pk = await conn.fetchval("SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                                 "WHERE conrelid = 'batch_metrics'::regclass AND contype = 'p'")
        assert pk == 'PRIMARY KEY (batch_id, "time")'
        indexes = {r["indexname"]: r["indexdef"] for r in await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'batch_metrics'")}
        assert 'USING brin ("time")' in indexes["batch_metrics_time"]
        assert '(stream_id, "time")' in indexes["batch_metrics_stream_time"]
        assert await migrate(conn) == []  # idempotent
    finally:
        await conn.close()


async def test_rows_go_to_their_day_and_late_or_redelivered_records_make_no_second_row(db_url):
    store = RowStore(db_url)
    now = time.time()
    try:
        first = row("0", now)
        late = row("1", now - 10 * DAY)  # ten days late: its partition is made on the spot
        assert await store.write([to_record(first), to_record(late)]) == 2
        # A redelivery: the worker finished again later, same batch, same capture time.
        again = replace(first, completed_at=now + 30, attempts=2)
        assert await store.write([to_record(again), to_record(late)]) == 0
        conn = store.conn
        assert await conn.fetchval("SELECT count(*) FROM batch_metrics") == 2
        where = {r["batch_id"]: r["part"] for r in await conn.fetch(
            "SELECT batch_id, tableoid::regclass::text AS part FROM batch_metrics")}
        day = lambda t: datetime.fromtimestamp(t, timezone.utc).strftime("%Y%m%d")  # noqa: E731
        assert where == {"s:0": f"batch_metrics_{day(now)}", "s:1": f"batch_metrics_{day(now - 10 * DAY)}"}
    finally:
        await store.close()


async def test_partitions_are_made_ahead_and_dropped_after_retention(db_url):
    conn = await asyncpg.connect(db_url)
    store = RowStore(db_url)
    try:
        await migrate(conn)
        today = date(2026, 3, 10)
        assert await maintain_partitions(conn, ahead_days=2, retention_days=5, today=today) == (3, 0)
        assert await partitions(conn) == ["batch_metrics_20260310", "batch_metrics_20260311", "batch_metrics_20260312"]
        old = datetime(2026, 3, 1, 12, tzinfo=timezone.utc).timestamp()
        assert await store.write([to_record(row("7", old))]) == 1
        assert "batch_metrics_20260301" in await partitions(conn)
        # Retention: everything before 2026-03-05 goes, whole partitions at a time.
        assert await maintain_partitions(conn, ahead_days=2, retention_days=5, today=today) == (0, 1)
        assert "batch_metrics_20260301" not in await partitions(conn)
        # The store still believes that day's partition exists; its next write there recreates it.
        assert await store.write([to_record(row("8", old))]) == 1
    finally:
        await store.close()
        await conn.close()


async def test_upgrading_an_unpartitioned_table_keeps_every_row(db_url):
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("CREATE TABLE aic_schema_migrations (version integer PRIMARY KEY, "
                           "description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        for version, description, sql in MIGRATIONS[:2]:
            await conn.execute(sql)
            await conn.execute("INSERT INTO aic_schema_migrations VALUES ($1, $2)", version, description)
        await conn.execute("INSERT INTO batch_metrics (batch_id, stream_id, status, worker_id, completed_at, captured_at) "
                           "VALUES ('a:0', 'a', 'ok', 'w', now(), now() - interval '3 days'), "
                           "       ('a:1', 'a', 'rejected', 'w', now(), NULL)")
        assert await migrate(conn) == [v for v, _, _ in MIGRATIONS[2:]]
        rows = await conn.fetch("SELECT batch_id, time, captured_at, completed_at FROM batch_metrics ORDER BY 1")
        assert [r["batch_id"] for r in rows] == ["a:0", "a:1"]
        assert rows[0]["time"] == rows[0]["captured_at"] and rows[1]["time"] == rows[1]["completed_at"]
        assert len(await partitions(conn)) == 2
    finally:
        await conn.close()


def test_retention_settings_are_validated():
    from shared.config import MetricsConfig

    with pytest.raises(ValueError):
        MetricsConfig(retention_days=-1)
    assert timedelta(days=MetricsConfig().retention_days) > timedelta(0)


async def test_the_database_takes_every_keyframe_reason_and_refuses_any_other(db_url):
    from shared.schemas import KEYFRAME_REASONS

    store = RowStore(db_url)
    now = time.time()
    try:
        rows = [to_record(row(str(100 + i), now, keyframe_reason=r)) for i, r in enumerate(KEYFRAME_REASONS)]
        assert await store.write(rows) == len(KEYFRAME_REASONS)
        conn = await asyncpg.connect(db_url)
        try:
            with pytest.raises(asyncpg.CheckViolationError):
                await conn.execute("INSERT INTO batch_metrics (batch_id, stream_id, status, worker_id, time, "
                                   "completed_at, keyframe_reason) VALUES ('s:999', 's', 'ok', 'w', now(), now(), "
                                   "'bogus')")
        finally:
            await conn.close()
    finally:
        await store.close()
