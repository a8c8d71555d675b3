"""The trade of segments: throughput against bytes for a recorded file ingested at full speed.

A chain serialises its stream: batch k+1 predicts from batch k's decoded frame, so one file's
backlog is coded one batch at a time, whatever the number of workers.  A stream that is not live
therefore starts a new segment, with a real key frame, every ``--segment-batches`` batches
(``AIC_SEGMENT_BATCHES``); segments are coded in parallel.  For each clip, each segment length and
each number of compressor processes, this runs the real pipeline
(``aic demo --source CLIP --streams 1 --frames N --compressors W``: embedded servers, default codec)
and reports its wall time (first publish to last row, so frames/s of the whole pipeline) and the
delivered bytes against one continuous x264 encoder at equal PSNR-Y (as ``benchmarks.e2e_vs_x264``
measures it).  Absolute times are this machine's; compare the ratios within one run.

    python -m benchmarks.segments [CLIP ...] [--frames 240] [--segments 0,16,8,4] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.e2e_vs_x264 import DEFAULT_CLIPS, _pct, anchor_curve, bytes_at
from benchmarks.rd import load_source


def run_demo(clip: str, frames: int, workers: int, segment_batches: int) -> dict:
    cmd = [sys.executable, "-m", "services.cli", "demo", "--source", clip, "--streams", "1", "--frames", str(frames),
           "--compressors", str(workers), "--json"]
    env = {**os.environ, "AIC_SEGMENT_BATCHES": str(segment_batches)}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
    if r.returncode != 0:
        raise SystemExit(f"aic demo failed on {clip} (exit {r.returncode}):\n{r.stderr[-2000:]}")
    return json.loads(r.stdout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.segments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("clips", nargs="*", default=DEFAULT_CLIPS, help="video clips (default: the three of ../shared/media)")
    p.add_argument("--frames", type=int, default=240, help="frames per clip (default %(default)s)")
    p.add_argument("--segments", default="0,16,8,4",
                   help="segment lengths in batches to compare, 0 = one chain (default %(default)s)")
    p.add_argument("--workers", default="1,2", help="compressor processes to compare (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    segments = [int(x) for x in a.segments.split(",")]
    workers = [int(x) for x in a.workers.split(",")]
    print(f"# {os.cpu_count()} CPUs; wall time from the first publish to the last row", file=sys.stderr)
    results = []
    for clip in a.clips:
        src = load_source(clip, a.frames, 1 << 16)
        curve = anchor_curve("x264-cont", src)
        base = None
        for w in workers:
            for seg in segments:
                demo = run_demo(clip, a.frames, w, seg)
                assert demo["frames"] == len(src.frames) and demo["missing"] == 0 and demo["duplicate_rows"] == 0
                at = bytes_at(curve, demo["psnr_y_mean"])
                row = {"clip": Path(clip).name, "workers": w, "segment_batches": seg, "frames": demo["frames"],
                       "bytes": demo["compressed_bytes"], "psnr_y": demo["psnr_y_mean"], "wall_s": demo["wall_s"],
                       "fps": demo["frames"] / demo["wall_s"],
                       "vs_x264_cont": None if at is None else demo["compressed_bytes"] / at - 1}
                base = base or row  # the first configuration of the clip: the ratios' reference
                row["speedup"] = row["fps"] / base["fps"]
                results.append(row)
                if not a.json:
                    print(f"{row['clip']:28} workers {w}  segment {seg or 'off':>3}  {row['bytes']:>9} B  "
                          f"PSNR-Y {row['psnr_y']:.2f}  vs x264-cont {_pct(row['vs_x264_cont']):>8}  "
                          f"{row['fps']:6.1f} frames/s  x{row['speedup']:.2f}", flush=True)
    if a.json:
        print(json.dumps({"cpus": os.cpu_count(), "runs": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
