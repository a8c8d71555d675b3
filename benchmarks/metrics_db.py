"""Metrics database benchmark: sustained insert rate into the partitioned, idempotent table, and
the performance-summary query over a million rows.

    python -m benchmarks.metrics_db [--rows 1000000] [--chunk 5000] [--database-url URL] [--json]

Rows go through the metrics service's own write path (COPY into a staging
table, INSERT ... ON CONFLICT (batch_id, time) DO NOTHING, dirty-bucket marks
for the rollups), in chunks as the service writes its micro-batches, spread
over ``--streams`` streams, 8 workers and 3 codecs, with capture times over the
last ``--hours`` (across a day boundary when the clock says so).  Then: one redelivered chunk (must insert nothing), the rollup
refresh over everything, and the latency of ``performance_summary`` (what GET
/api/v1/aic/performance/summary runs) over the last 24 hours, 200 times.
Without ``--database-url`` an embedded PostgreSQL runs in a temporary folder.
Absolute figures belong to the machine that ran them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from services.metrics.migrations import refresh_rollups
from services.metrics.queries import performance_summary
from services.metrics.writer import RowStore, to_record
from shared.embedded import PostgresServer
from shared.schemas import BatchMetrics


def make_rows(n: int, streams: int, hours: float, seed: int = 0) -> list[tuple]:
    rng = np.random.default_rng(seed)
    now = time.time()
    t = now - rng.uniform(0, hours * 3600, n)
    codecs = np.array(["hybrid", "x264", "neural"])[rng.integers(0, 3, n)]
    size = rng.integers(5_000, 90_000, n)
    psnr = rng.uniform(28, 46, n)
    lat = rng.gamma(2.0, 60.0, n)
    out = []
    for i in tqdm(range(n), desc="records", unit="row", unit_scale=True, disable=None):
        sid = f"cam-{i % streams:04d}"
        out.append(to_record(BatchMetrics(
            f"{sid}:{i}", sid, "ok", f"w{i % 8}", float(t[i]) + 0.5, batch_seq=i, codec=str(codecs[i]),
            codec_params="level=4", frames=8, width=1280, height=720, raw_bytes=11_059_200,
            compressed_bytes=int(size[i]), kbps=float(size[i]) * 8 / 320, psnr_y=float(psnr[i]),
            psnr_rgb=float(psnr[i]) - 1.5, ms_ssim=0.98, ms_ssim_frames=1, encode_ms=40.0, quality_ms=30.0,
            latency_ms=float(lat[i]), captured_at=float(t[i]), attempts=1, level=4, mode="adaptive",
            baseline_bytes=int(size[i] * 1.2) if i % 8 == 0 else None)))  # fmt: skip
    return out


async def run(url: str, rows: int, chunk: int, streams: int, hours: float) -> dict:
    recs = make_rows(rows, streams, hours)
    store = RowStore(url)
    conn = await store.connect()
    inserted = 0
    t0 = time.perf_counter()
    done_at = []  # (rows so far, seconds so far) after each chunk
    for i in tqdm(range(0, rows, chunk), desc="insert", unit="chunk", disable=None):
        inserted += await store.write(recs[i : i + chunk])
        done_at.append((min(i + chunk, rows), time.perf_counter() - t0))
    insert_s = time.perf_counter() - t0
    duplicates = await store.write(recs[:chunk])
    t0 = time.perf_counter()
    minutes = await refresh_rollups(conn)
    refresh_s = time.perf_counter() - t0
    until = datetime.now(timezone.utc)
    lat = []
    for _ in range(200):
        t0 = time.perf_counter()
        summary = await performance_summary(conn, until - timedelta(hours=24), until)
        lat.append((time.perf_counter() - t0) * 1000)
    total = await conn.fetchval("SELECT count(*) FROM batch_metrics")
    parts = await conn.fetchval("SELECT count(*) FROM pg_inherits WHERE inhparent = 'batch_metrics'::regclass")
    await store.close()
    return {
        "rows": rows, "chunk": chunk, "streams": streams, "hours": hours, "inserted": inserted, "duplicates_inserted": duplicates,
        "rows_in_table": total, "partitions": parts, "insert_rows_per_s": rows / insert_s,
        "slowest_tenth_rows_per_s": slowest_tenth(done_at),
        "rollup_refresh_s": refresh_s, "rollup_minutes": minutes,
        "summary_ms_p50": float(np.percentile(lat, 50)), "summary_ms_p95": float(np.percentile(lat, 95)),
        "summary_groups": len(summary),
    }


def slowest_tenth(done_at: list[tuple[int, float]]) -> float:
    """The insert rate over the slowest tenth of the run (by rows), so that "sustained" means the
    rate held while the table and its indexes were largest, not an average flattered by the start."""
    rows = done_at[-1][0]
    rates, start = [], (0, 0.0)
    for n, t in done_at:
        if n - start[0] >= rows / 10 or n == rows:
            if t > start[1]:
                rates.append((n - start[0]) / (t - start[1]))
            start = (n, t)
    return min(rates)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--chunk", type=int, default=5000, help="rows per write (the service's micro-batch)")
    p.add_argument("--streams", type=int, default=24, help="streams the rows belong to (default %(default)s)")
    p.add_argument("--hours", type=float, default=6.0,
                   help="capture times spread over the last N hours (default %(default)s: 1M rows are 24 "
                        "streams at ~19 frames/s in batches of 8)")
    p.add_argument("--database-url", help="an existing database (default: embedded PostgreSQL in a temp folder)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="aic-dbbench-") as tmp:
        server = None if a.database_url else PostgresServer(Path(tmp) / "pg").start()
        try:
            result = asyncio.run(run(a.database_url or server.url, a.rows, a.chunk, a.streams, a.hours))
        finally:
            if server:
                server.stop()
    if a.json:
        print(json.dumps(result))
    else:
        print(f"{result['rows']:,} rows ({a.streams} streams, {a.hours:g} h) in chunks of {a.chunk}: {result['insert_rows_per_s']:,.0f} rows/s "
              f"(slowest tenth {result['slowest_tenth_rows_per_s']:,.0f} rows/s; {result['inserted']:,} inserted, {result['partitions']} day partitions); "
              f"a redelivered chunk inserted {result['duplicates_inserted']}")
        print(f"rollup refresh of {result['rollup_minutes']:,} minutes: {result['rollup_refresh_s']:.1f} s")
        print(f"performance summary over 24 h: p50 {result['summary_ms_p50']:.2f} ms, "
              f"p95 {result['summary_ms_p95']:.2f} ms ({result['summary_groups']} groups)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
