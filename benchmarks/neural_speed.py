"""Speed of the neural codec at one frame size, stage by stage, beside x264 in the same run.

    python -m benchmarks.neural_speed [--source CLIP] [--frames 8] [--level 4] [--device cpu]

Stages per frame: analysis transform (g_a + h_a), entropy encoding (integer
hyper-synthesis + constriction), entropy decoding (the same in reverse),
synthesis transform (g_s); then whole encode and decode through the codec
interface (yuv420p in and out, colour conversion included).  Absolute figures
belong to the machine that ran them; the x264 ratio is measured side by side.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from services.ingest import read_batches
from shared.codecs import create_codec, decode_payload
from shared.neural.colour import rgb_to_yuv420, yuv420_to_rgb


def _fps(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="lavfi:testsrc2=size=1280x720:rate=30", help="clip or lavfi: source")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--level", type=int, default=4)
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)

    batch = next(read_batches(a.source, "speed", a.frames, a.frames))
    w, h, frames = batch.width, batch.height, batch.frames
    kw = {"device": a.device, **({"model": a.model} if a.model else {})}
    codec = create_codec("neural", **kw)
    coder = codec.coder
    from shared.neural.coder import pad_to

    t = {}
    yuv420_to_rgb(frames[:1], w, h)  # warm-up
    t0 = time.perf_counter()
    x = yuv420_to_rgb(frames, w, h)
    t["colour_in"] = time.perf_counter() - t0
    xp = pad_to(x, coder.net.stride)
    coder.analyse(xp[:1], a.level)  # warm-up (allocator, kernels)
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    t0 = time.perf_counter()
    ys, zs = zip(*(coder.analyse(xp[i : i + 1], a.level) for i in range(len(frames))))
    sync()
    t["analysis"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    coded = [coder.encode_latents(y, z) for y, z in zip(ys, zs)]
    t["entropy_encode"] = time.perf_counter() - t0
    shape = coder.z_shape(h, w)
    t0 = time.perf_counter()
    y_hats = [coder.decode_latents(data, shape) for data, _ in coded]
    t["entropy_decode"] = time.perf_counter() - t0
    assert all(torch.equal(a_, b) for a_, (_, b) in zip(y_hats, coded))
    t0 = time.perf_counter()
    for yh in y_hats:
        coder.synthesise(yh, a.level)
    sync()
    t["synthesis"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rgb_to_yuv420(x)
    t["colour_out"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    payload = codec.encode(frames, w, h, 30.0, a.level)
    t["codec_encode"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    decode_payload(payload)
    t["codec_decode"] = time.perf_counter() - t0
    x264 = create_codec("x264")
    x264.encode(frames, w, h, 30.0)
    t0 = time.perf_counter()
    x264.encode(frames, w, h, 30.0)
    t["x264_encode"] = time.perf_counter() - t0

    n = len(frames)
    fps = {k: _fps(n, v) for k, v in t.items()}
    result = {"size": f"{w}x{h}", "frames": n, "level": a.level, "device": a.device,
              "threads": torch.get_num_threads(), "fps": fps,
              "bpp": 8 * len(payload) / (n * w * h),
              "x264_over_neural_encode": fps["x264_encode"] / fps["codec_encode"]}
    if a.json:
        print(json.dumps(result))
    else:
        print(f"{w}x{h}, {n} frames, level {a.level}, {a.device}, {result['threads']} threads")
        for k, v in fps.items():
            print(f"  {k:16} {v:8.2f} frames/s   ({1000 / v:7.1f} ms/frame)")
        print(f"  x264 encodes {result['x264_over_neural_encode']:.0f}x faster than the neural encoder here")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
