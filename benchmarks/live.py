"""A live stream through the whole stack with default settings: does every batch make its row in time?

Starts the embedded stack as ``aic up`` does (one compressor, default codec and
flags, the metrics service), publishes a source paced at its frame rate as
``aic ingest --realtime`` does, for ``--seconds``, and reads the rows back: the
latency of each batch (its last frame's paced capture → compressed payload and
row durably published), the presets the worker chose, the key-frame reasons,
kbps and PSNR-Y.  Exits 1 if the p99 latency is over ``--p99-ms`` or a batch
lacks its row.

    python -m benchmarks.live [--source lavfi:testsrc2=size=1280x720:rate=30] [--seconds 120] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import uuid
from collections import Counter
from pathlib import Path

import asyncpg
import numpy as np

from services.demo import wait_for_rows
from services.ingest import ingest
from services.stack import Stack
from shared import bus as busmod
from shared import logs
from shared.bus import Bus


async def run(stack: Stack, source: str, seconds: float, fps: float) -> list[dict]:
    bus = await Bus.connect(stack.bus_config("admin"), name="live-bench")
    await bus.ensure_topology()
    sid = f"live-{uuid.uuid4().hex[:6]}"
    # The stream starts once a worker is fetching, as a user's would on a running stack (a worker's
    # start-up is not a batch's latency).
    while (await bus.js.consumer_info(busmod.FRAMES_STREAM, busmod.COMPRESSOR_CONSUMER)).num_waiting < 1:
        await asyncio.sleep(0.2)
    try:
        report = await ingest(bus, source, sid, 8, int(seconds * fps), realtime=True, progress=False)
    finally:
        await bus.close()
    await wait_for_rows(stack.database_url, report.batch_ids, timeout=120, tick=stack.supervise_once)
    conn = await asyncpg.connect(stack.database_url)
    try:
        return [dict(r) for r in await conn.fetch(
            "SELECT * FROM batch_metrics WHERE stream_id = $1 ORDER BY batch_seq", sid)]
    finally:
        await conn.close()


def summarize(rows: list[dict], seconds: float) -> dict:
    lat = np.array([r["latency_ms"] for r in rows if r["latency_ms"] is not None])
    presets = Counter(p.split("=", 1)[1] for r in rows for p in (r["codec_params"] or "").split(",")
                      if p.startswith("preset="))
    return {
        "batches": len(rows), "status": dict(Counter(r["status"] for r in rows)),
        "codecs": dict(Counter(r["codec"] for r in rows)),
        "latency_ms": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                       "max": float(lat.max())} if len(lat) else None,
        # The second half alone: whether a backlog built at start (slower presets first) drains.
        "latency_ms_second_half": {"p50": float(np.percentile(lat[len(lat) // 2:], 50)),
                                   "p99": float(np.percentile(lat[len(lat) // 2:], 99))} if len(lat) > 1 else None,
        "presets": dict(presets),
        "keyframe_reasons": dict(Counter(r["keyframe_reason"] or "chained" for r in rows)),
        "kbps": sum(r["compressed_bytes"] or 0 for r in rows) * 8 / seconds / 1000,
        "psnr_y_mean": float(np.mean([r["psnr_y"] for r in rows if r["psnr_y"] is not None])),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.live", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="lavfi:testsrc2=size=1280x720:rate=30", help="a live-paced source (default %(default)s)")
    p.add_argument("--fps", type=float, default=30.0, help="the source's frame rate, to count its frames (default 30)")
    p.add_argument("--seconds", type=float, default=120.0, help="how long the stream runs (default %(default)s)")
    p.add_argument("--p99-ms", type=float, default=1000.0, help="latency the p99 must stay under (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    logs.configure("warning")  # the in-process gateway's per-batch lines would drown the result
    with tempfile.TemporaryDirectory(prefix="aic-live-") as tmp, Stack(Path(tmp)) as stack:
        rows = asyncio.run(run(stack, a.source, a.seconds, a.fps))
    s = summarize(rows, a.seconds)
    s.update(source=a.source, seconds=a.seconds)
    if a.json:
        print(json.dumps(s))
    else:
        lat = s["latency_ms"] or {}
        print(f"{a.source}, {a.seconds:g} s: {s['batches']} batches, {s['status']}, codecs {s['codecs']}\n"
              f"  latency p50 {lat.get('p50', float('nan')):.0f} ms, p99 {lat.get('p99', float('nan')):.0f} ms, "
              f"max {lat.get('max', float('nan')):.0f} ms; second half p50 "
              f"{(s['latency_ms_second_half'] or {}).get('p50', float('nan')):.0f} ms, p99 "
              f"{(s['latency_ms_second_half'] or {}).get('p99', float('nan')):.0f} ms\n"
              f"  presets {s['presets']}, key frames {s['keyframe_reasons']}\n"
              f"  {s['kbps']:.0f} kbps, mean PSNR-Y {s['psnr_y_mean']:.2f} dB")
    ok = s["status"] == {"ok": s["batches"]} and s["latency_ms"] and s["latency_ms"]["p99"] <= a.p99_ms
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
