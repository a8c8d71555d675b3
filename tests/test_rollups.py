"""Rollups: every minute and hour bucket equals a direct aggregate of the raw rows, late and repeated records included."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest

from services.metrics.migrations import refresh_rollups
from services.metrics.writer import RowStore, to_record
from shared.schemas import BatchMetrics
from tests.test_schema import db_url  # noqa: F401  (fixture)

KEY = ("bucket", "stream_id", "worker_id", "codec", "mode")


def batches(rng: np.random.Generator, n: int, start: float) -> list[BatchMetrics]:
    out = []
    for i in range(n):
        t = start + float(rng.uniform(0, 3 * 3600))  # three hours of capture times
        status = str(rng.choice(["ok"] * 8 + ["rejected", "failed"]))
        ok = status == "ok"
        fallback = str(rng.choice(["quality", "size", "latency", "error"])) if ok and rng.random() < 0.3 else None
        sampled = ok and rng.random() < 0.25
        out.append(BatchMetrics(
            f"s{i % 3}:{i}", f"s{i % 3}", status, f"w{i % 2}", t + 1, batch_seq=i, captured_at=t,
            codec=str(rng.choice(["hybrid", "x264"])) if ok else None, mode=str(rng.choice(["adaptive", "off"])),
            frames=8 if ok else None, raw_bytes=11_059_200 if ok else None,
            compressed_bytes=int(rng.integers(1000, 90_000)) if ok else None, kbps=float(rng.uniform(50, 900)) if ok else None,
            psnr_y=float(rng.uniform(28, 45)) if ok else None, ms_ssim=float(rng.uniform(0.9, 1)) if ok else None,
            latency_ms=float(rng.gamma(2, 80)) if ok else None, fallback_reason=fallback,
            baseline_bytes=int(rng.integers(1000, 90_000)) if sampled else None))
    return out


def expected(rows: list[BatchMetrics], seconds: int) -> dict[tuple, dict]:
    """The aggregates, computed here in Python from the rows we know are in the table."""
    groups: dict[tuple, list[BatchMetrics]] = {}
    for r in rows:
        bucket = int(r.captured_at // seconds * seconds)
        groups.setdefault((bucket, r.stream_id, r.worker_id, r.codec or "", r.mode), []).append(r)
    out = {}
    for k, g in groups.items():
        lat = [r.latency_ms for r in g if r.latency_ms is not None]
        out[k] = {
            "batches": len(g), "ok": sum(r.status == "ok" for r in g), "rejected": sum(r.status == "rejected" for r in g),
            "frames": sum(r.frames or 0 for r in g), "compressed_bytes": sum(r.compressed_bytes or 0 for r in g),
            "psnr_y_min": min((r.psnr_y for r in g if r.psnr_y is not None), default=None),
            "latency_p95_ms": float(np.percentile(lat, 95)) if lat else None,  # linear, as percentile_cont
            "fallback_size": sum(r.fallback_reason == "size" for r in g),
            "sampled": sum(r.baseline_bytes is not None for r in g),
            "baseline_bytes": sum(r.baseline_bytes or 0 for r in g),
        }
    return out


async def table(conn, name: str) -> dict[tuple, dict]:
    rows = await conn.fetch(f"SELECT * FROM {name}")
    return {(int(r["bucket"].timestamp()), *(r[k] for k in KEY[1:])): dict(r) for r in rows}


def check(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k, w in want.items():
        for field, value in w.items():
            if value is None or isinstance(value, int):
                assert got[k][field] == value, (k, field)
            else:
                assert got[k][field] == pytest.approx(value, rel=1e-9), (k, field)


async def test_rollups_equal_a_direct_aggregate_also_after_late_and_redelivered_records(db_url):  # noqa: F811
    rng = np.random.default_rng(7)
    start = (time.time() // 3600 - 5) * 3600
    rows = batches(rng, 600, start)
    store = RowStore(db_url)
    try:
        conn = await store.connect()
        await store.write([to_record(r) for r in rows[:500]])
        assert await refresh_rollups(conn) > 0
        check(await table(conn, "batch_rollup_1m"), expected(rows[:500], 60))
        check(await table(conn, "batch_rollup_1h"), expected(rows[:500], 3600))

        # Late records (for buckets already rolled up, hours ago) and redeliveries of old ones.
        late = rows[500:]
        repeats = [replace(r, completed_at=r.completed_at + 99, attempts=2) for r in rows[:50]]
        await store.write([to_record(r) for r in late + repeats])
        assert await refresh_rollups(conn) > 0
        check(await table(conn, "batch_rollup_1m"), expected(rows, 60))
        check(await table(conn, "batch_rollup_1h"), expected(rows, 3600))
        assert await refresh_rollups(conn) == 0  # nothing new: nothing recomputed

        saved = await conn.fetch("SELECT * FROM v_bandwidth_saved")
        sampled = [r for r in rows if r.baseline_bytes is not None]
        assert sum(r["sampled_batches"] for r in saved) == len(sampled)
        assert sum(r["native_bytes"] for r in saved) == sum(r.baseline_bytes for r in sampled)
        rate = {r["stream_id"]: r for r in await conn.fetch("SELECT * FROM v_fallback_rate")}
        assert rate["s0"]["fallbacks"] == sum(1 for r in rows if r.stream_id == "s0" and r.fallback_reason)
    finally:
        await store.close()
