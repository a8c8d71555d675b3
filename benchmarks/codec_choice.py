"""Which chained native codec needs fewer bytes at the pipeline's operating points: x264 or SVT-AV1?

The worker could choose per stream between chained x264 (``x264-psnr``, preset
medium, reordering inside the batch: what a file gets by default) and chained
SVT-AV1, if SVT-AV1 ever needed fewer bytes for the same quality.  For each clip
this codes the first ``--frames`` frames in chained batches of 8, as the worker
does, with x264 at each ``--crf`` (23 is the default operating point), and with
SVT-AV1 at each ``--av1-presets`` over CRFs 14-62, and reports SVT-AV1's bytes
at x264's mean per-batch PSNR-Y (linear in log bytes between its two nearest
points) and each coding's encode frames/s on this machine.

    python -m benchmarks.codec_choice [CLIP ...] [--frames 96] [--crf 23,32] [--av1-presets 8,6]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.e2e_vs_x264 import DEFAULT_CLIPS, _pct, batch_psnr_y, bytes_at
from benchmarks.rd import load_source
from shared.codecs import NativeCodec
from shared.codecs.reference import Reference

AV1_CRFS = range(14, 63, 6)


def chained(codec: NativeCodec, src, crf: int) -> tuple[int, float, float]:
    """(payload bytes, mean per-batch PSNR-Y, encode frames/s) of the clip in chained batches of 8."""
    ref, out, nbytes, t = None, np.empty_like(src.frames), 0, 0.0
    for k, s in enumerate(range(0, len(src.frames), 8)):
        t0 = time.perf_counter()
        payload, dec = codec.encode_reconstruct(src.frames[s:s + 8], src.width, src.height, src.fps, crf=crf,
                                                reference=ref)
        t += time.perf_counter() - t0
        ref = Reference(k, src.width, src.height, dec[-1])
        out[s:s + 8] = dec
        nbytes += len(payload)
    return nbytes, batch_psnr_y(src, out), len(src.frames) / t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.codec_choice", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("clips", nargs="*", default=DEFAULT_CLIPS, help="video clips (default: the three of ../shared/media)")
    p.add_argument("--frames", type=int, default=96, help="frames per clip (default %(default)s)")
    p.add_argument("--crf", default="23,32", help="x264 CRFs: the operating points compared (default %(default)s)")
    p.add_argument("--av1-presets", default="8,6", help="SVT-AV1 presets (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    crfs = [int(c) for c in a.crf.split(",")]
    presets = a.av1_presets.split(",")
    print(f"# {os.cpu_count()} CPUs; chained batches of 8, x264-psnr medium with reordering vs SVT-AV1")
    results = []
    for clip in a.clips:
        src = load_source(clip, a.frames, 1 << 16)
        x264 = NativeCodec("x264-psnr", reorder=True, preset="medium")
        curves = {}
        for preset in presets:
            av1 = NativeCodec("av1", preset=preset)
            pts = [chained(av1, src, crf) for crf in AV1_CRFS]
            curves[preset] = (sorted((q, b) for b, q, _ in pts), float(np.mean([f for *_, f in pts])))
        for crf in crfs:
            xb, xq, xf = chained(x264, src, crf)
            row = {"clip": Path(clip).name, "x264_crf": crf, "x264_bytes": xb, "psnr_y": xq, "x264_fps": xf, "av1": {}}
            for preset, (curve, fps) in curves.items():
                at = bytes_at(curve, xq)
                row["av1"][preset] = {"bytes": at, "vs_x264": None if at is None else at / xb - 1, "fps": fps}
            results.append(row)
            if not a.json:
                cells = "  ".join(f"av1 preset {k}: {_pct(v['vs_x264']):>8} ({v['fps']:.0f} fps)"
                                  for k, v in row["av1"].items())
                print(f"{row['clip']:28} x264 CRF {crf}: {xb:>8} B  PSNR-Y {xq:.2f}  ({xf:.0f} fps)  {cells}",
                      flush=True)
    if a.json:
        print(json.dumps({"cpus": os.cpu_count(), "points": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
