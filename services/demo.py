"""``aic demo``: the whole pipeline on this machine, end to end, with a results table.

Starts the embedded stack (or uses ``AIC_NATS_URL``/``AIC_DATABASE_URL``),
ingests N streams in parallel, waits until every published batch has its
metrics row, and prints per-stream results.  Exit code 1 if any row is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import asyncpg

from services.ingest import ingest
from services.stack import Stack
from shared import logs
from shared.bus import Bus

SUMMARY_SQL = """
SELECT stream_id,
       count(*)                                              AS rows,
       count(*) FILTER (WHERE status = 'ok')                 AS ok,
       count(*) FILTER (WHERE status = 'rejected')           AS rejected,
       count(*) FILTER (WHERE status = 'failed')             AS failed,
       coalesce(string_agg(DISTINCT codec, ','), '-')        AS codec,
       count(*) FILTER (WHERE fallback_reason IS NOT NULL)   AS fallbacks,
       coalesce(sum(frames), 0)::bigint                      AS frames,
       coalesce(sum(raw_bytes), 0)::bigint                   AS raw_bytes,
       coalesce(sum(compressed_bytes), 0)::bigint            AS compressed_bytes,
       avg(kbps)                                             AS kbps,
       avg(psnr_y)                                           AS psnr_y,
       avg(ms_ssim)                                          AS ms_ssim,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms)  AS p50,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) AS p99
FROM batch_metrics WHERE stream_id = ANY($1::text[])
GROUP BY stream_id ORDER BY stream_id
"""

FALLBACK_SQL = """
SELECT fallback_reason, count(*) AS n FROM batch_metrics
WHERE stream_id = ANY($1::text[]) AND fallback_reason IS NOT NULL GROUP BY fallback_reason
"""

TOTAL_SQL = """
SELECT count(*) AS rows, count(*) FILTER (WHERE status = 'ok') AS ok,
       avg(psnr_y) AS psnr_y, avg(ms_ssim) AS ms_ssim,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms)  AS p50,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) AS p99
FROM batch_metrics WHERE stream_id = ANY($1::text[])
"""


async def wait_for_rows(url: str, batch_ids: list[str], timeout: float, tick=None) -> int:
    """Poll until every batch id has a row (or the timeout); returns how many batch ids have one.

    ``tick`` runs on every poll (the demo uses it to supervise its services)."""
    deadline = time.monotonic() + timeout
    found = 0
    while True:
        if tick is not None:
            tick()
        try:
            conn = await asyncpg.connect(url, timeout=5)
            try:
                found = await conn.fetchval(
                    "SELECT count(DISTINCT batch_id) FROM batch_metrics WHERE batch_id = ANY($1::text[])", batch_ids
                )
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError):
            pass  # table not created yet, or database restarting
        if found >= len(batch_ids) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.3)


FAULT_TARGETS = ("nats", "postgres", "compressor", "metrics")


def _pid(stack: Stack, target: str) -> int | None:
    """The process ``kill -9`` hits for a fault target: nats-server, the PostgreSQL postmaster, the
    first compressor, the metrics service."""
    if target == "nats":
        return stack.nats.proc.pid if stack.nats and stack.nats.proc else None
    if target == "postgres":
        try:
            return int((stack.postgres.pgdata / "postmaster.pid").read_text().split()[0])
        except (AttributeError, OSError, ValueError, IndexError):
            return None
    name = "compressor-0" if target == "compressor" else target
    s = next((s for s in stack.services if s.name == name), None)
    return s.proc.pid if s and s.alive() else None


class Supervisor(threading.Thread):
    """``stack.supervise_once`` every half second on a thread of its own, which lives until the demo's
    end: the servers it restarts get their death signal when the thread that started them ends."""

    def __init__(self, stack: Stack):
        super().__init__(daemon=True)
        self.stack, self.done = stack, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            self.stack.supervise_once()


async def inject_faults(stack: Stack, targets: list[str], window_s: float, rng: random.Random) -> list[dict]:
    """``kill -9`` of each target once, at a random moment of the run's first ``window_s`` seconds (in a
    random order, each at least 3 s after the one before); returns when and what was killed."""
    t0, done = time.time(), []
    moments = sorted(rng.uniform(0.1, 0.8) * window_s for _ in targets)
    for target, at in zip(rng.sample(targets, len(targets)), moments):
        await asyncio.sleep(max(0.0, t0 + max(at, (done[-1]["at_s"] + 3) if done else 0) - time.time()))
        pid = _pid(stack, target)
        if pid is None:
            continue
        os.kill(pid, signal.SIGKILL)
        done.append({"target": target, "pid": pid, "at_s": round(time.time() - t0, 2), "at": time.time()})
    return done


async def _recovery(conn, stream_ids: list[str], faults: list[dict]) -> None:
    """Each fault's recovery time: from the kill to the next row written (rows stop meanwhile)."""
    for f in faults:
        nxt = await conn.fetchval(
            "SELECT extract(epoch FROM min(inserted_at)) FROM batch_metrics WHERE stream_id = ANY($1::text[]) "
            "AND inserted_at > to_timestamp($2)", stream_ids, f["at"])
        f["recovered_after_s"] = None if nxt is None else round(float(nxt) - f["at"], 2)
        del f["at"]


async def _demo(a: argparse.Namespace, stack: Stack) -> dict:
    run = uuid.uuid4().hex[:6]
    stream_ids = [f"demo-{run}-{i}" for i in range(a.streams)]
    faults: list[dict] = []
    bus = await Bus.connect(stack.bus_config("gateway"), name="aic-demo")  # what a media gateway may do
    try:
        t0 = time.monotonic()
        feeds = asyncio.gather(
            *(ingest(bus, a.source, sid, a.batch_frames, a.frames, realtime=bool(a.faults), progress=False
                     if a.faults else None) for sid in stream_ids)
        )
        if a.faults:  # while live streams run at their frame rate, so that every kill lands mid-run
            window = a.frames / 30.0
            faults = await inject_faults(stack, a.faults, window, random.Random(a.seed))
        stats = await feeds
    finally:
        await bus.close()
    batch_ids = [b for s in stats for b in s.batch_ids]
    found = await wait_for_rows(stack.database_url, batch_ids, a.timeout, None if a.faults else stack.supervise_once)
    wall = time.monotonic() - t0
    conn = await asyncpg.connect(stack.database_url)
    try:
        per_stream = [dict(r) for r in await conn.fetch(SUMMARY_SQL, stream_ids)]
        total = dict(await conn.fetchrow(TOTAL_SQL, stream_ids))
        fallbacks = {r["fallback_reason"]: r["n"] for r in await conn.fetch(FALLBACK_SQL, stream_ids)}
        rows = await conn.fetchval("SELECT count(*) FROM batch_metrics WHERE batch_id = ANY($1::text[])", batch_ids)
        await _recovery(conn, stream_ids, faults)
    finally:
        await conn.close()
    return {
        "source": a.source,
        "streams": stream_ids,
        "codecs": sorted({c for r in per_stream for c in r["codec"].split(",") if c != "-"}),
        "batches_published": len(batch_ids),
        "batches_compressed": total["ok"],
        "metrics_rows": rows,
        "missing": len(batch_ids) - found,
        "duplicate_rows": rows - found,  # at-least-once must never count a batch twice
        "frames": sum(s.frames for s in stats),
        "raw_bytes": sum(s.raw_bytes for s in stats),
        "compressed_bytes": sum(int(r["compressed_bytes"]) for r in per_stream),
        "psnr_y_mean": total["psnr_y"],
        "ms_ssim_mean": total["ms_ssim"],
        "latency_p50_ms": total["p50"],
        "latency_p99_ms": total["p99"],
        "fallbacks": fallbacks,
        "rejected": sum(r["rejected"] for r in per_stream),
        "failed": sum(r["failed"] for r in per_stream),
        "wall_s": round(wall, 3),
        "faults": faults,
        "dropped_at_gateway": sum(s.dropped for s in stats),
        "per_stream": per_stream,
    }


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(result: dict) -> None:
    cols = ("stream", "codec", "frames", "batches", "raw MB", "comp kB", "kbps", "PSNR-Y", "MS-SSIM", "p50 ms", "p99 ms", "fallbacks", "rejects")
    rows = [
        (
            r["stream_id"], r["codec"], str(r["frames"]), str(r["rows"]), f"{r['raw_bytes'] / 1e6:.1f}",
            f"{r['compressed_bytes'] / 1e3:.1f}", _fmt(r["kbps"], ".0f"), _fmt(r["psnr_y"], ".2f"),
            _fmt(r["ms_ssim"], ".4f"), _fmt(r["p50"], ".0f"), _fmt(r["p99"], ".0f"), str(r["fallbacks"]),
            str(r["rejected"] + r["failed"]),
        )  # fmt: skip
        for r in result["per_stream"]
    ]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    line = "  ".join(c.rjust(w) for c, w in zip(cols, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))
    if result["fallbacks"]:
        print("\nnative fallbacks (the neural path would have been worse): "
              + ", ".join(f"{k}={v}" for k, v in sorted(result["fallbacks"].items())))
    for f in result["faults"]:
        print(f"fault: kill -9 of {f['target']} (pid {f['pid']}) at {f['at_s']:.1f} s; rows again "
              f"{_fmt(f['recovered_after_s'], '.1f')} s later")
    if result["dropped_at_gateway"]:
        print(f"dropped at the gateway (live source, bus away): {result['dropped_at_gateway']} batches, each a "
              "rejected row")
    print(
        f"\n{result['batches_published']} batches published, {result['metrics_rows']} rows "
        f"({result['missing']} missing, {result['duplicate_rows']} duplicate) in {result['wall_s']:.1f}s; "
        f"source {result['source']}"
    )


def run_demo(a: argparse.Namespace) -> int:
    logs.configure(level="warning", json=False)
    if a.frames is None:
        a.frames = 900 if a.faults else 64
    tmp = None if a.data_dir else tempfile.mkdtemp(prefix="aic-demo-")
    root = Path(a.data_dir or tmp)
    try:
        with Stack(root, compressors=a.compressors, compressor_args=["--codec", a.codec]) as stack:
            supervisor = Supervisor(stack) if a.faults else None
            if supervisor:
                supervisor.start()
            try:
                result = asyncio.run(_demo(a, stack))
            finally:
                if supervisor:
                    supervisor.done.set()
                    supervisor.join()
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        print(json.dumps(result, default=str))
    else:
        print_table(result)
    if result["missing"]:
        print(f"error: {result['missing']} batches have no metrics row", file=sys.stderr)
    if result["duplicate_rows"]:
        print(f"error: {result['duplicate_rows']} rows repeat a batch that already had one", file=sys.stderr)
    return 1 if result["missing"] or result["duplicate_rows"] else 0
