"""Delivered bytes end to end against one continuous x264 encoder at equal PSNR-Y, per clip.

For each clip this runs the real pipeline as a new user would
(``aic demo --source CLIP --streams 1 --frames N --json``: embedded NATS and
PostgreSQL, the default codec, one compressor), and reads what it delivered:
the payload bytes of every batch (aic's container headers included) and the
mean of the batches' PSNR-Y.  It then codes the same frames with what a user
would run instead — one continuous x264 encoder over the whole clip, veryfast,
``tune=psnr,zerolatency``, 2 threads, no periodic key frame (what plain ffmpeg
gives a live stream) — at every CRF from 10 to 44, measures the same mean
per-batch PSNR-Y, and interpolates its bytes at the delivered PSNR-Y (linear in
log bytes).  ``vs`` is delivered / anchor - 1: negative means aic sends fewer
bytes.  The same with x264's B-frames and mb-tree (``tune=psnr``) is printed
for context.

    python -m benchmarks.e2e_vs_x264 [CLIP ...] [--frames 96] [--codec auto] [--level L] [--try-codec C] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.rd import ContinuousX264, load_source
from shared.quality import measure_batch

MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"
DEFAULT_CLIPS = [str(MEDIA / n) for n in ("call_screenshare_720p.mp4", "camera_576p.mp4", "motion_graphics_352p.mp4")]
CRFS = range(10, 45, 2)


def run_demo(clip: str, frames: int, codec: str, env: dict | None = None) -> dict:
    cmd = [sys.executable, "-m", "services.cli", "demo", "--source", clip, "--streams", "1", "--frames", str(frames),
           "--codec", codec, "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        raise SystemExit(f"aic demo failed on {clip} (exit {r.returncode}):\n{r.stderr[-2000:]}")
    return json.loads(r.stdout)


def batch_psnr_y(src, decoded: np.ndarray, batch: int = 8) -> float:
    """The mean of per-batch PSNR-Y, as the metrics rows (and so the demo) average it."""
    return float(np.mean([measure_batch(src.frames[i:i + batch], decoded[i:i + batch], src.width, src.height, 0).psnr_y
                          for i in range(0, len(src.frames), batch)]))


def anchor_curve(name: str, src) -> list[tuple[float, int]]:
    enc = ContinuousX264(name)
    return sorted((batch_psnr_y(src, dec), nbytes) for nbytes, dec, *_ in (enc.roundtrip(0, src, crf) for crf in CRFS))


def bytes_at(curve: list[tuple[float, int]], psnr_y: float) -> float | None:
    """The anchor's bytes at ``psnr_y``, linear in log bytes between the two points around it."""
    for (q0, b0), (q1, b1) in zip(curve, curve[1:]):
        if q0 <= psnr_y <= q1 and q1 > q0:
            t = (psnr_y - q0) / (q1 - q0)
            return math.exp(math.log(b0) + t * (math.log(b1) - math.log(b0)))
    return None  # outside the CRF range


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e_vs_x264", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("clips", nargs="*", default=DEFAULT_CLIPS, help="video clips (default: the three of ../shared/media)")
    p.add_argument("--frames", type=int, default=96, help="frames per clip (default %(default)s)")
    p.add_argument("--codec", default="auto", help="the compressor's --codec (default %(default)s, as a user gets)")
    p.add_argument("--level", type=int, help="the compressors' rate level (AIC_LEVEL; default: the codec's own)")
    p.add_argument("--try-codec", help="the compressors' --try-codec (AIC_TRY_CODEC; default none)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    env = {k: str(v) for k, v in (("AIC_LEVEL", a.level), ("AIC_TRY_CODEC", a.try_codec)) if v is not None}
    results = []
    for clip in a.clips:
        demo = run_demo(clip, a.frames, a.codec, env)
        src = load_source(clip, a.frames, 1 << 16)
        assert len(src.frames) == demo["frames"], "the demo and the anchor must code the same frames"
        row = {"clip": Path(clip).name, "codecs": demo["codecs"], "frames": demo["frames"],
               "delivered_bytes": demo["compressed_bytes"], "psnr_y": demo["psnr_y_mean"], "wall_s": demo["wall_s"]}
        for name in ("x264-cont", "x264-cont-bf"):
            at = bytes_at(anchor_curve(name, src), demo["psnr_y_mean"])
            row[name] = {"bytes": at, "vs": None if at is None else demo["compressed_bytes"] / at - 1}
        results.append(row)
        if not a.json:
            cells = "  ".join(f"{n}: {_pct(row[n]['vs'])}" for n in ("x264-cont", "x264-cont-bf"))
            print(f"{row['clip']:28} {','.join(row['codecs']):14} {row['delivered_bytes']:>9} B  "
                  f"PSNR-Y {row['psnr_y']:.2f}  vs {cells}  ({row['frames'] / row['wall_s']:.1f} frames/s)",
                  flush=True)
    vs = [r["x264-cont"]["vs"] for r in results if r["x264-cont"]["vs"] is not None]
    summary = {"clips": results, "mean_vs_x264_cont": float(np.mean(vs)) if vs else None}
    if a.json:
        print(json.dumps(summary))
    else:
        print(f"mean vs continuous x264 (zerolatency): {_pct(summary['mean_vs_x264_cont'])}")
    return 0


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:+.1f} %"


if __name__ == "__main__":
    raise SystemExit(main())
