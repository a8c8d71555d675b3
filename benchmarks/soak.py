"""A long run at a steady rate through the whole stack: does memory stay flat, and does every batch
make exactly one row?

Starts the stack as ``aic up`` does (embedded NATS and PostgreSQL, one compressor, the metrics
service) and runs ``aic ingest --realtime`` as its own process for ``--minutes``.  Samples the
resident memory (RSS) of every process — nats-server, PostgreSQL (all its processes), the
compressor, the metrics service, the gateway — after a warm-up minute and at the end, and counts
the rows: published, rows, duplicates, missing.  Exits 1 if a batch lacks its row or has two.

    python -m benchmarks.soak [--minutes 30] [--source lavfi:testsrc2=size=640x360:rate=30] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import psutil

from services.stack import Stack
from shared import logs

WARM_S = 60.0


def rss_mib(pid: int | None, tree: bool = False) -> float | None:
    """Resident memory of a process (and its children, for PostgreSQL's backends), MiB."""
    if pid is None:
        return None
    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)] if tree else [p]
        return round(sum(q.memory_info().rss for q in procs if q.is_running()) / 2**20, 1)
    except psutil.NoSuchProcess:
        return None


def sample(stack: Stack, gateway: subprocess.Popen) -> dict[str, float | None]:
    out = {"nats-server": rss_mib(stack.nats.proc.pid if stack.nats else None),
           "postgresql (all processes)": rss_mib(stack.postgres.proc.pid if stack.postgres and stack.postgres.proc else None, tree=True)}
    for s in stack.services:
        out[s.name] = rss_mib(s.proc.pid if s.proc else None)
    out["gateway (aic ingest)"] = rss_mib(gateway.pid)
    return out


async def count_rows(url: str, sid: str) -> dict:
    conn = await asyncpg.connect(url)
    try:
        r = await conn.fetchrow("SELECT count(*) AS rows, count(DISTINCT batch_seq) AS distinct_seqs, "
                                "count(*) FILTER (WHERE status = 'ok') AS ok, max(batch_seq) AS last "
                                "FROM batch_metrics WHERE stream_id = $1", sid)
        lat = await conn.fetchrow("SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS p50, "
                                  "percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) AS p99 "
                                  "FROM batch_metrics WHERE stream_id = $1 AND status = 'ok'", sid)
        return {**dict(r), **{k: round(v or 0, 1) for k, v in dict(lat).items()}}
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--source", default="lavfi:testsrc2=size=640x360:rate=30")
    p.add_argument("--fps", type=float, default=30.0, help="the source's frame rate (for the frame count)")
    p.add_argument("--batch-frames", type=int, default=8)
    p.add_argument("--every-s", type=float, default=60.0, help="seconds between RSS samples (all are kept)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    logs.configure()
    frames = int(a.minutes * 60 * a.fps) // a.batch_frames * a.batch_frames
    batches = frames // a.batch_frames
    sid = f"soak-{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory() as tmp, Stack(Path(tmp) / "data", compressors=1) as stack:
        env = {**os.environ, "AIC_DATA_DIR": str(stack.data_dir), **stack.nats_env("gateway")}
        with open(Path(tmp) / "gateway.log", "wb") as glog:
            gateway = subprocess.Popen([sys.executable, "-m", "services.cli", "ingest", a.source, "--stream-id", sid,
                                        "--frames", str(frames), "--batch-frames", str(a.batch_frames), "--realtime"],
                                       env=env, stdout=glog, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        samples: list[dict] = []
        next_at = WARM_S
        while gateway.poll() is None:
            stack.supervise_once()
            if time.monotonic() - t0 >= next_at:
                samples.append({"t_s": round(time.monotonic() - t0), **sample(stack, gateway)})
                print(json.dumps(samples[-1]), file=sys.stderr, flush=True)
                next_at += a.every_s
            time.sleep(0.5)
        end = {"t_s": round(time.monotonic() - t0), **sample(stack, gateway)}  # (the gateway has exited)
        deadline = time.monotonic() + 120
        while True:
            stack.supervise_once()
            counts = asyncio.run(count_rows(stack.database_url, sid))
            if counts["rows"] >= batches or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        final = sample(stack, gateway)
    first, last = samples[0] if samples else end, samples[-1] if samples else end
    missing = batches - counts["distinct_seqs"]
    duplicates = counts["rows"] - counts["distinct_seqs"]
    result = {"source": a.source, "minutes": a.minutes, "batches_published": batches, "gateway_rc": gateway.returncode,
              **counts, "missing": missing, "duplicates": duplicates,
              "rss_mib": {k: {"start": first.get(k), "end": last.get(k) if k != "gateway (aic ingest)" else last.get(k),
                              "after_drain": final.get(k)} for k in first if k != "t_s"},
              "rss_start_t_s": first["t_s"], "rss_end_t_s": last["t_s"], "samples": samples}
    if a.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(f"{a.source}, {a.minutes:g} min at the source's rate: {batches} batches published, {counts['rows']} rows "
              f"({counts['ok']} ok), {duplicates} duplicates, {missing} missing; latency p50 {counts['p50']} ms, "
              f"p99 {counts['p99']} ms; gateway exit {gateway.returncode}")
        print(f"{'process':28} {'RSS MiB at ' + str(first['t_s']) + ' s':>16} {'at ' + str(last['t_s']) + ' s':>10}")
        for k, v in result["rss_mib"].items():
            print(f"{k:28} {v['start']!s:>16} {v['end']!s:>10}")
    return 0 if missing == 0 and duplicates == 0 and gateway.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
