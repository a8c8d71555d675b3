"""Pipeline benchmark: x264 alone vs the whole pipeline, bus and COPY throughput.

Everything is measured side by side in one run on this machine, so the ratios
hold even when the machine is noisy; absolute numbers are for this machine only.

    python benchmarks/pipeline.py [SOURCE] [--frames N] [--json]

SOURCE defaults to ../shared/media/call_screenshare_720p.mp4.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import asyncpg
import numpy as np

from services.demo import wait_for_rows
from services.ingest import ingest, read_batches
from services.metrics.writer import RowStore, to_record
from services.stack import Stack
from shared import bus as busmod
from shared.bus import Bus
from shared.codecs import create_codec
from shared.config import BusConfig
from shared.pixfmt import frame_size
from shared.schemas import BatchMetrics, FrameBatch

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "media" / "call_screenshare_720p.mp4"


def x264_alone(batches) -> tuple[float, float]:
    """Frames/s of the compressor's own encoder settings, nothing else, and CPU seconds per frame."""
    codec = create_codec("x264")
    frames = sum(b.frame_count for b in batches)
    t0, c0 = time.perf_counter(), time.process_time()
    for b in batches:
        codec.encode(b.frames, b.width, b.height, b.fps)
    return frames / (time.perf_counter() - t0), (time.process_time() - c0) / frames


def stages(batches) -> dict:
    """Milliseconds per 8-frame batch of each step of the compressor's work, alone, one after the
    other in this process: what the pipeline's compressor spends beside x264's encode."""
    from shared.codecs import decode_payload
    from shared.quality import measure_batch
    from shared.schemas import unpack_frame_batch

    codec = create_codec("x264")
    payloads = [codec.encode(b.frames, b.width, b.height, b.fps) for b in batches]
    packed = [b.pack() for b in batches]
    b0 = batches[0]

    def per_batch(fn, items):
        # Each result is dropped, as the worker drops each batch's: holding 31 fresh 11 MB buffers
        # costs page faults the pipeline does not pay.
        t0 = time.perf_counter()
        for x in items:
            fn(x)
        return (time.perf_counter() - t0) / len(items) * 1000

    ms = {}
    decoded = [decode_payload(p)[1] for p in payloads]  # for the quality steps; warms the decoder
    ms["decode"] = per_batch(lambda p: decode_payload(p)[1], payloads)
    pairs = list(zip(batches, decoded))
    ms["psnr_y_all_frames"] = per_batch(lambda bd: measure_batch(bd[0].frames, bd[1], b0.width, b0.height, 0), pairs)
    ms["with_psnr_rgb_ms_ssim_1_frame"] = per_batch(
        lambda bd: measure_batch(bd[0].frames, bd[1], b0.width, b0.height, 1), pairs)
    ms["pack"] = per_batch(lambda b: b.pack(), batches)
    ms["unpack"] = per_batch(unpack_frame_batch, packed)
    return ms


def _role(p) -> str:
    """Which stage a process of the stack is, from its command line."""
    cmd = " ".join(p.cmdline())
    for key, role in (("nats-server", "nats"), ("postgres", "postgres"), ("services.compressor", "compressor"),
                      ("services.metrics", "metrics")):
        if key in cmd:
            return role
    return "other"


def cpu_seconds() -> dict[str, float]:
    """CPU seconds so far of this process (ingest, the benchmark client) and of the stack's
    processes, by role: where a pipeline's cores go.  Each process counts its reaped children
    too (PostgreSQL's backends for each connection).  Servers given by AIC_NATS_URL or
    AIC_DATABASE_URL are not children and are not counted."""
    import psutil

    me = psutil.Process()
    t = me.cpu_times()
    out = {"ingest (this process)": t.user + t.system}
    for child in me.children(recursive=True):
        try:
            role, t = _role(child), child.cpu_times()
            out[role] = out.get(role, 0.0) + t.user + t.system + t.children_user + t.children_system
        except psutil.Error:  # exited meanwhile
            continue
    return out


def pipeline_fps(source: str, frames: int, quality_frames: int, root: Path) -> dict:
    """Frames/s from the first ingest publish to the last metrics row, through real servers."""
    args = ["--codec", "x264", "--quality-frames", str(quality_frames)]
    with Stack(root, compressor_args=args) as stack:

        async def go() -> dict:
            bus = await Bus.connect(stack.bus_config("admin"), name="bench")
            await bus.ensure_topology()
            # Warm up: one batch, so process start-up is not timed.
            warm = await ingest(bus, source, f"warm-{uuid.uuid4().hex[:6]}", 8, 8, progress=False)
            await wait_for_rows(stack.database_url, warm.batch_ids, 120)
            sid = f"bench-{uuid.uuid4().hex[:6]}"
            cpu0, t0 = cpu_seconds(), time.time()
            stats = await ingest(bus, source, sid, 8, frames, progress=False)
            found = await wait_for_rows(stack.database_url, stats.batch_ids, 600)
            cpu1, t1 = cpu_seconds(), time.time()
            await bus.close()
            conn = await asyncpg.connect(stack.database_url)
            r = await conn.fetchrow(
                "SELECT max(completed_at) AS done, min(completed_at) AS first, avg(encode_ms) AS enc, avg(quality_ms) AS q, "
                "percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS p50 FROM batch_metrics WHERE stream_id=$1",
                sid,
            )
            await conn.close()
            wall = r["done"].timestamp() - t0
            return {
                "frames": stats.frames,
                "rows": found,
                "batches": stats.batches,
                "fps": stats.frames / wall,
                # First row to last row: the compressor's steady state, start-up excluded.
                "steady_fps": (stats.frames - 8) / (r["done"].timestamp() - r["first"].timestamp()),
                "encode_ms_per_batch": r["enc"],
                "quality_ms_per_batch": r["q"],
                "latency_p50_ms": r["p50"],
                # Includes the rows' last poll interval; what matters is each role's share.
                "cpu_s": {k: round(v - cpu0.get(k, 0.0), 2) for k, v in cpu1.items()},
                "cpu_wall_s": t1 - t0,
            }

        return asyncio.run(go())


async def bus_throughput(cfg: BusConfig, batch_bytes: bytes, count: int) -> dict:
    """MB/s publishing raw batches (claim check for large ones) and consuming them back."""
    bus = await Bus.connect(cfg, name="bench-bus")
    await bus.ensure_topology()
    sid = f"busbench-{uuid.uuid4().hex[:6]}"
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    for i in range(count):
        await bus.publish(busmod.frames_subject(sid), batch_bytes, f"{sid}:{i}", kind="frames")
    t1 = time.perf_counter()
    cpu1 = cpu_seconds()
    # The work queue allows one consumer per subject: read through the compressor's
    # own durable, as a worker would (no compressor runs in this stack).
    sub = await bus.pull(busmod.FRAMES_STREAM, busmod.COMPRESSOR_CONSUMER)
    got = 0
    t2 = time.perf_counter()
    while got < count:
        for m in await sub.fetch(1, timeout=10):
            data = await bus.payload(m)
            assert len(data) == len(batch_bytes)
            await m.ack()
            await bus.release(m)
            got += 1
    t3 = time.perf_counter()
    cpu2 = cpu_seconds()
    await bus.close()
    mb = len(batch_bytes) * count / 1e6

    def cpu_ms(role: str, a: dict, b: dict) -> float:
        return (b.get(role, 0.0) - a.get(role, 0.0)) / count * 1000
    return {
        "batch_mb": len(batch_bytes) / 1e6,
        "batches": count,
        "inline": len(batch_bytes) <= bus.max_inline,
        "publish_mb_s": mb / (t1 - t0),
        "consume_mb_s": mb / (t3 - t2),
        # CPU per batch: the NATS server and this client (nats-py), publishing then consuming.
        "nats_cpu_ms": {"publish": cpu_ms("nats", cpu0, cpu1), "consume": cpu_ms("nats", cpu1, cpu2)},
        "client_cpu_ms": {"publish": cpu_ms("ingest (this process)", cpu0, cpu1),
                          "consume": cpu_ms("ingest (this process)", cpu1, cpu2)},
    }


async def copy_rows_per_s(database_url: str, rows: int, chunk: int = 1000) -> dict:
    """Rows/s through the metrics service's write path (COPY → ON CONFLICT insert)."""
    store = RowStore(database_url)
    run = uuid.uuid4().hex[:6]
    now = time.time()
    recs = [
        to_record(
            BatchMetrics(
                f"copy-{run}:{i}", f"copy-{run}", "ok", "bench", now, batch_seq=i, codec="x264", frames=8,
                width=1280, height=720, raw_bytes=11059200, compressed_bytes=40000, kbps=1200.0, psnr_y=41.0,
                psnr_rgb=39.0, ms_ssim=0.99, ms_ssim_frames=1, encode_ms=40.0, quality_ms=60.0, latency_ms=120.0,
                captured_at=now, attempts=1,
            )  # fmt: skip
        )
        for i in range(rows)
    ]
    t0 = time.perf_counter()
    inserted = 0
    for i in range(0, rows, chunk):
        inserted += await store.write(recs[i : i + chunk])
    t1 = time.perf_counter()
    dup = await store.write(recs[:chunk])  # redelivered records: no new rows
    await store.close()
    return {"rows": rows, "inserted": inserted, "duplicates_inserted": dup, "rows_per_s": rows / (t1 - t0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", nargs="?", default=str(DEFAULT_SOURCE))
    ap.add_argument("--frames", type=int, default=248, help="frames to push through (default 248 = 31 batches)")
    ap.add_argument("--copy-rows", type=int, default=50_000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if not a.source.startswith("lavfi:") and not Path(a.source).exists():
        raise SystemExit(f"source not found: {a.source}")

    from shared import logs

    logs.configure(level="warning")
    batches = list(read_batches(a.source, "bench", 8, a.frames))
    c0 = time.process_time()  # a second, warm pass: the gateway's own decode and conversion
    for _ in read_batches(a.source, "bench", 8, a.frames):
        pass
    source_cpu_ms = (time.process_time() - c0) / sum(b.frame_count for b in batches) * 1000
    w, h = batches[0].width, batches[0].height
    result: dict = {
        "source": a.source,
        "size": f"{w}x{h}",
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with tempfile.TemporaryDirectory(prefix="aic-bench-") as tmp:
        root = Path(tmp)
        result["x264_alone_fps"], cpu_a = x264_alone(batches)
        result["pipeline_default"] = pipeline_fps(a.source, a.frames, 1, root / "p1")
        result["pipeline_no_quality_sample"] = pipeline_fps(a.source, a.frames, 0, root / "p0")
        result["x264_alone_fps_after"], cpu_b = x264_alone(batches)
        result["x264_alone_cpu_s_per_frame"] = (cpu_a + cpu_b) / 2
        result["source_decode_cpu_ms_per_frame"] = source_cpu_ms
        result["stages_ms_per_batch"] = stages(batches)
        x = (result["x264_alone_fps"] + result["x264_alone_fps_after"]) / 2
        result["efficiency_default"] = result["pipeline_default"]["fps"] / x
        result["efficiency_no_quality_sample"] = result["pipeline_no_quality_sample"]["fps"] / x
        with Stack(root / "io", compressors=0, with_metrics=False) as stack:
            result["bus_raw_720p"] = asyncio.run(bus_throughput(stack.bus_config("admin"), batches[0].pack(), 40))
            # A 1080p-sized batch (8 x 3.1 MB) exceeds max_payload and takes the claim check.
            big = FrameBatch("big", 0, 1920, 1080, 30, 1, 0, time.time(), np.zeros((8, frame_size(1920, 1080)), np.uint8))
            result["bus_raw_1080p"] = asyncio.run(bus_throughput(stack.bus_config("admin"), big.pack(), 16))
        with Stack(root / "db", compressors=0, with_metrics=True) as stack:
            for s in stack.services:
                s.stop()  # only the database is needed
            from services.metrics.migrations import migrate

            async def prep():
                c = await asyncpg.connect(stack.database_url)
                await migrate(c)
                await c.close()

            asyncio.run(prep())
            result["copy"] = asyncio.run(copy_rows_per_s(stack.database_url, a.copy_rows))
    if a.json:
        print(json.dumps(result, indent=2, default=str))
        return
    p1, p0 = result["pipeline_default"], result["pipeline_no_quality_sample"]
    print(f"source {a.source} ({w}x{h}, {a.frames} frames) on {result['machine']}, {result['date']}")
    print(f"x264 alone (veryfast, zerolatency, CRF 23, GOP 8) : {x:8.1f} fps  (before {result['x264_alone_fps']:.1f}, after {result['x264_alone_fps_after']:.1f})")
    print(f"pipeline, quality sample 1 frame/batch (default) : {p1['fps']:8.1f} fps  efficiency {result['efficiency_default']:.2f}")
    print(f"pipeline, PSNR-Y only (--quality-frames 0)       : {p0['fps']:8.1f} fps  efficiency {result['efficiency_no_quality_sample']:.2f}")
    print(f"  steady state (first row to last row): default {p1['steady_fps']:.1f} fps ({p1['steady_fps'] / x:.2f}), "
          f"PSNR-Y only {p0['steady_fps']:.1f} fps ({p0['steady_fps'] / x:.2f})")
    print(f"  per batch (default): encode+decode {p1['encode_ms_per_batch']:.1f} ms, quality {p1['quality_ms_per_batch']:.1f} ms, latency p50 {p1['latency_p50_ms']:.0f} ms")
    for label, p in (("default", p1), ("PSNR-Y only", p0)):
        total = sum(p["cpu_s"].values())
        shares = ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(p["cpu_s"].items(), key=lambda kv: -kv[1]))
        print(f"  CPU while running ({label}): {total:.1f} s in {p['cpu_wall_s']:.1f} s ({total / p['cpu_wall_s']:.2f} cores): {shares}")
    xs = result["x264_alone_cpu_s_per_frame"]
    print(f"  x264 alone: {xs * 1000:.2f} CPU ms per frame; the pipeline (default): "
          f"{sum(p1['cpu_s'].values()) / p1['frames'] * 1000:.2f} CPU ms per frame")
    st = result["stages_ms_per_batch"]
    print(f"  alone, per batch: decode {st['decode']:.1f} ms, PSNR-Y of all frames {st['psnr_y_all_frames']:.1f} ms, "
          f"with PSNR-RGB + MS-SSIM of 1 frame {st['with_psnr_rgb_ms_ssim_1_frame']:.1f} ms, pack {st['pack']:.1f} ms, "
          f"unpack {st['unpack']:.1f} ms; source decode {result['source_decode_cpu_ms_per_frame']:.2f} CPU ms per frame")
    for key in ("bus_raw_720p", "bus_raw_1080p"):
        b = result[key]
        n, c = b["nats_cpu_ms"], b["client_cpu_ms"]
        print(f"bus, raw {b['batch_mb']:.1f} MB batches ({'inline' if b['inline'] else 'claim check'}): publish {b['publish_mb_s']:.0f} MB/s, consume {b['consume_mb_s']:.0f} MB/s; "
              f"CPU ms per batch: NATS {n['publish']:.0f} in / {n['consume']:.0f} out, nats-py {c['publish']:.0f} / {c['consume']:.0f}")
    c = result["copy"]
    print(f"metrics COPY path: {c['rows_per_s']:,.0f} rows/s ({c['rows']} rows; {c['duplicates_inserted']} of 1000 redelivered rows inserted)")


if __name__ == "__main__":
    main()
