"""End to end through the policy: on sampled batches, delivered bytes never exceed native's at matched quality.

Starts the whole stack on embedded servers (one compressor with a learned codec
and the policy, the metrics service), ingests each clip as its own stream, and
reads the rows back from PostgreSQL.  With ``--compare-every 1`` every batch is
sampled: the compressor also codes it natively at the cheapest rate that
reaches the learned payload's quality, and the row records that size as
``baseline_bytes``.  The script prints, per clip, what went out and why, the
delivered and baseline totals over sampled batches, and fails (exit 1) if any
sampled batch delivered more bytes than its native baseline.

    python benchmarks/policy_e2e.py [CLIP ...] [--codec hybrid] [--frames 64] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import uuid
from collections import Counter
from pathlib import Path

import asyncpg
from tqdm import tqdm

from services.demo import wait_for_rows
from services.ingest import ingest
from services.stack import Stack
from shared.bus import Bus

MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"
DEFAULT_CLIPS = [str(MEDIA / n) for n in ("call_screenshare_720p.mp4", "camera_576p.mp4", "motion_graphics_352p.mp4")]


async def run_clips(stack: Stack, clips: list[str], frames: int) -> dict[str, list[dict]]:
    bus = await Bus.connect(stack.bus_config("admin"), name="policy-e2e")
    await bus.ensure_topology()
    streams = {}
    try:
        for clip in tqdm(clips, desc="ingest", unit="clip", disable=None):
            sid = f"{Path(clip).stem[:40]}-{uuid.uuid4().hex[:6]}"
            report = await ingest(bus, clip, sid, 8, frames, progress=False)
            streams[clip] = (sid, report.batch_ids)
    finally:
        await bus.close()
    ids = [i for _, batch_ids in streams.values() for i in batch_ids]
    await wait_for_rows(stack.database_url, ids, timeout=60 + 30 * len(ids), tick=stack.supervise_once)
    conn = await asyncpg.connect(stack.database_url)
    try:
        return {clip: [dict(r) for r in await conn.fetch(
            "SELECT * FROM batch_metrics WHERE stream_id = $1 ORDER BY batch_seq", sid)]
            for clip, (sid, _) in streams.items()}
    finally:
        await conn.close()


def summarize(rows: list[dict]) -> dict:
    sampled = [r for r in rows if r["baseline_bytes"] is not None]
    return {
        "batches": len(rows),
        "status": dict(Counter(r["status"] for r in rows)),
        "codec_used": dict(Counter(r["codec"] for r in rows)),
        "fallbacks": dict(Counter(r["fallback_reason"] for r in rows if r["fallback_reason"])),
        "sampled": len(sampled),
        "delivered_bytes_sampled": sum(r["compressed_bytes"] for r in sampled),
        "baseline_bytes_sampled": sum(r["baseline_bytes"] for r in sampled),
        "over_baseline": [r["batch_seq"] for r in sampled if r["compressed_bytes"] > r["baseline_bytes"]],
        "mean_psnr_y": (sum(r["psnr_y"] for r in ok) / len(ok)) if (ok := [r for r in rows if r["psnr_y"] is not None])
        else None,
        "delivered_bytes": sum(r["compressed_bytes"] for r in rows),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("clips", nargs="*", default=DEFAULT_CLIPS, help="video files (default: the three clips in ../shared/media)")
    p.add_argument("--codec", default="hybrid", help="learned codec under test (default %(default)s)")
    p.add_argument("--level", type=int, default=4, help="its rate level (default %(default)s)")
    p.add_argument("--target", default="psnr_y:30", help="policy quality target (default %(default)s)")
    p.add_argument("--compare-every", type=int, default=1, help="sample 1 in N batches (default %(default)s: all)")
    p.add_argument("--fallback", default="x264", help="native codec compared against (default %(default)s)")
    p.add_argument("--frames", type=int, default=64, help="frames per clip (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--report", type=Path, help="also write `aic report --html` of the run here")
    a = p.parse_args(argv)
    for c in a.clips:
        if not Path(c).exists():
            raise SystemExit(f"policy_e2e: {c}: no such file")
    args = ["--codec", a.codec, "--level", str(a.level), "--target", a.target,
            "--compare-every", str(a.compare_every), "--quality-frames", "0", "--fallback", a.fallback]
    with tempfile.TemporaryDirectory(prefix="aic-policy-") as tmp, Stack(Path(tmp), compressor_args=args) as stack:
        rows = asyncio.run(run_clips(stack, a.clips, a.frames))
        if a.report:
            from services.report import run as report

            report(stack.database_url, "1h", None, a.report, refresh=True)
    result = {"codec": a.codec, "level": a.level, "target": a.target, "compare_every": a.compare_every,
              "fallback": a.fallback,
              "clips": {Path(c).name: summarize(r) for c, r in rows.items()}}
    if a.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"codec {a.codec} level {a.level}, target {a.target}, native {a.fallback}, "
              f"1 in {a.compare_every} batches sampled")
        for name, s in result["clips"].items():
            saved = 1 - s["delivered_bytes_sampled"] / max(1, s["baseline_bytes_sampled"])
            print(f"  {name}: {s['batches']} batches, codec {s['codec_used']}, fallbacks {s['fallbacks'] or 'none'}, "
                  f"sampled {s['sampled']}: delivered {s['delivered_bytes_sampled']} B vs native "
                  f"{s['baseline_bytes_sampled']} B ({100 * saved:+.1f} % saved), over native: "
                  f"{s['over_baseline'] or 'none'}, mean PSNR-Y {s['mean_psnr_y'] or float('nan'):.2f}, "
                  f"status {s['status']}")
    bad = any(s["over_baseline"] or s["status"].keys() - {"ok"} for s in result["clips"].values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
