"""Bandwidth adherence and live mode changes, end to end.

    python -m benchmarks.budget [CLIP ...] [--budget 300] [--frames 240] [--codec auto] [--json] [--report F.html]

Starts the stack on embedded servers, sets each clip's stream to ``adaptive``,
and plays a receiver that publishes ``{"kbps": BUDGET}`` on
``aic.control.<stream>`` every half second while the gateway ingests the clip
in real time.  Halfway through, the stream is switched to ``aggressive`` with
``aic config``'s KV record.  From the rows it reports, per clip:

- the achieved bitrate over every 2-second window of media time that starts
  after the first second (each batch's bits spread over its duration), as a
  ratio to the budget: the worst window must stay within +10 %;
- the mean bitrate and PSNR-Y;
- how many batches completed after the mode change still carried the old mode
  (the change must take effect within 2 batches).

Exit status 1 if any clip breaks either bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import av

from services.demo import wait_for_rows
from services.ingest import ingest
from services.stack import Stack
from shared.bus import Bus
from shared.control import StreamConfig, estimate_subject

MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"
DEFAULT_CLIPS = [str(MEDIA / "call_screenshare_720p.mp4"), str(MEDIA / "camera_576p.mp4")]
WINDOW_S = 2.0


def clip_fps(path: str) -> float:
    with av.open(path) as c:
        return float(c.streams.video[0].average_rate or 25)


def windows(rows: list[dict], fps: float, budget: float) -> tuple[float, float]:
    """(worst 2-s window kbps / budget after the first second, mean kbps / budget)."""
    spans = []  # (start s, end s, bits)
    t = 0.0
    for r in sorted(rows, key=lambda r: r["batch_seq"]):
        d = r["frames"] / fps
        spans.append((t, t + d, 8 * r["compressed_bytes"]))
        t += d
    worst, counted = 0.0, 0
    for start, _, _ in spans:
        if start < 1.0 or start + WINDOW_S > t + 1e-9:
            continue
        end = start + WINDOW_S
        bits = sum(b * max(0.0, min(e, end) - max(s, start)) / (e - s) for s, e, b in spans)
        worst = max(worst, bits / WINDOW_S / 1000 / budget)
        counted += 1
    if not counted:
        raise SystemExit("budget: clip too short for a 2-second window after the first second (--frames)")
    mean = sum(b for _, _, b in spans) / t / 1000 / budget
    return worst, mean


async def run_clip(stack: Stack, clip: str, budget: float, frames: int) -> dict:
    bus = await Bus.connect(stack.bus_config("admin"), name="budget-bench")
    await bus.ensure_topology()
    sid = f"{Path(clip).stem[:40]}-{uuid.uuid4().hex[:6]}"
    kv = await bus.config_kv()
    await kv.put(sid, StreamConfig(mode="adaptive").to_json())
    stop = asyncio.Event()

    async def receiver():
        while not stop.is_set():
            await bus.nc.publish(estimate_subject(sid), json.dumps({"kbps": budget}).encode())
            await asyncio.sleep(0.5)

    rx = asyncio.create_task(receiver())
    await asyncio.sleep(1.0)  # the workers hear the receiver before the first batch
    fps = clip_fps(clip)
    change_after_s = frames / fps / 2
    changed_at = None

    async def switch():
        nonlocal changed_at
        await asyncio.sleep(change_after_s)
        await kv.put(sid, StreamConfig(mode="aggressive").to_json())
        changed_at = time.time()

    sw = asyncio.create_task(switch())
    try:
        report = await ingest(bus, clip, sid, 8, frames, realtime=True, progress=False)
        await sw
        await wait_for_rows(stack.database_url, report.batch_ids, timeout=120 + 5 * len(report.batch_ids),
                            tick=stack.supervise_once)
    finally:
        stop.set()
        await rx
        await bus.close()
    conn = await asyncpg.connect(stack.database_url)
    try:
        rows = [dict(r) for r in await conn.fetch(
            "SELECT * FROM batch_metrics WHERE stream_id = $1 ORDER BY batch_seq", sid)]
    finally:
        await conn.close()
    worst, mean = windows(rows, fps, budget)
    late = [r["batch_seq"] for r in rows if r["completed_at"].timestamp() > changed_at and r["mode"] == "adaptive"]
    return {"clip": Path(clip).name, "batches": len(rows), "budget_kbps": budget, "worst_window_ratio": worst,
            "mean_ratio": mean, "mean_psnr_y": sum(r["psnr_y"] for r in rows) / len(rows),
            "codecs": sorted({r["codec"] for r in rows}), "batches_with_old_mode_after_change": len(late),
            "budget_recorded": all(r["budget_kbps"] == budget for r in rows)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("clips", nargs="*", default=DEFAULT_CLIPS)
    p.add_argument("--budget", type=float, default=300.0, help="kbps (default %(default)s)")
    p.add_argument("--frames", type=int, default=240, help="frames per clip (default %(default)s)")
    p.add_argument("--codec", default="auto", help="compressor codec (default %(default)s)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--report", type=Path, help="also write `aic report --html` of the run here")
    a = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="aic-budget-") as tmp, \
            Stack(Path(tmp), compressor_args=["--codec", a.codec, "--quality-frames", "0"]) as stack:
        for clip in a.clips:
            results.append(asyncio.run(run_clip(stack, clip, a.budget, a.frames)))
        if a.report:
            from services.report import run as report

            report(stack.database_url, "1h", None, a.report, refresh=True)
    ok = all(r["worst_window_ratio"] <= 1.10 and r["batches_with_old_mode_after_change"] <= 2 for r in results)
    if a.json:
        print(json.dumps({"ok": ok, "results": results}, indent=1))
    else:
        for r in results:
            print(f"{r['clip']}: {r['batches']} batches, codecs {r['codecs']}, budget {r['budget_kbps']:g} kbps: "
                  f"worst 2-s window {100 * r['worst_window_ratio']:.1f} % of budget, mean "
                  f"{100 * r['mean_ratio']:.1f} %, PSNR-Y {r['mean_psnr_y']:.2f} dB; batches still in the old mode "
                  f"after the change: {r['batches_with_old_mode_after_change']}; budget on every row: "
                  f"{r['budget_recorded']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
