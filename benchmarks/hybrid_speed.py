"""Speed of the hybrid codec (x264 + learned restoration) beside x264 alone, in one run.

    python -m benchmarks.hybrid_speed [--source CLIP] [--frames 8] [--level 4] [--device cpu] [--json]

Stages: x264 encode, x264 decode, the restoration network (per frame), then the
whole hybrid encode (x264 encode + decode + network + blend weights) and decode
(x264 decode + network) through the codec interface.  A batch whose blend
weights are all zero skips the network at decode; the figures here force it on
(weights as chosen for this clip are printed).  Absolute figures belong to the
machine; ratios to x264 are measured side by side.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from services.ingest import read_batches
from shared.codecs import create_codec, decode_payload, read_header
from shared.modelstore import DEFAULT_MODELS
from shared.neural.restoration import to_planes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="lavfi:testsrc2=size=1280x720:rate=30", help="clip or lavfi: source")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--level", type=int, default=4)
    p.add_argument("--model", default=None, help=f"restoration model (default {DEFAULT_MODELS['hybrid']})")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)

    batch = next(read_batches(a.source, "speed", a.frames, a.frames))
    w, h, frames, n = batch.width, batch.height, batch.frames, batch.frame_count
    hybrid = create_codec("hybrid", device=a.device, **({"model": a.model} if a.model else {}))
    x264 = hybrid.base
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    planes = to_planes(frames, w, h)
    hybrid.model.restorer.correction(planes[:1], a.level)  # warm-up
    t = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        sync()
        t[name] = time.perf_counter() - t0
        return out

    base = timed("x264_encode", lambda: x264.encode(frames, w, h, 30.0, a.level))
    timed("x264_decode", lambda: decode_payload(base))
    timed("network", lambda: hybrid.model.restorer.correction(planes, a.level))
    payload = timed("hybrid_encode", lambda: hybrid.encode(frames, w, h, 30.0, a.level))
    blend = bytes(read_header(payload)[1][:n])
    forced = bytearray(payload)
    start = len(payload) - len(read_header(payload)[1])
    forced[start : start + n] = bytes(b or 0x11 for b in blend)  # every frame restored, as in the worst case
    timed("hybrid_decode", lambda: decode_payload(bytes(forced)))
    fps = {k: n / v for k, v in t.items()}
    result = {"size": f"{w}x{h}", "frames": n, "level": a.level, "device": a.device,
              "threads": torch.get_num_threads(), "fps": fps,
              "blend_weights": [(b >> 4, b & 15) for b in blend],
              "x264_over_hybrid_encode": fps["x264_encode"] / fps["hybrid_encode"],
              "x264_over_hybrid_decode": fps["x264_decode"] / fps["hybrid_decode"]}
    if a.json:
        print(json.dumps(result))
    else:
        print(f"{w}x{h}, {n} frames, level {a.level}, {a.device}, {result['threads']} threads")
        for k, v in fps.items():
            print(f"  {k:14} {v:8.2f} frames/s   ({1000 / v:7.1f} ms/frame)")
        print(f"  x264 alone encodes {result['x264_over_hybrid_encode']:.1f}x and decodes "
              f"{result['x264_over_hybrid_decode']:.1f}x faster than the hybrid here")
        print(f"  blend weights chosen (luma, chroma in 1/12): {result['blend_weights']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
