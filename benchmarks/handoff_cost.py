"""What the reference hand-off costs per batch: CPU on the worker and the receiver, and bus bytes.

Codes a clip (default: the 720p screen-share clip, 64 frames, batches of 8) with
x264-psnr reordering inside the batch, once as closed GOPs and once chained, at
each preset given, interleaving the two so that machine noise hits both alike,
and reports per batch: the worker's CPU ms to encode and reconstruct, the
receiver's CPU ms to decode (for a chained batch: re-creating the seed, then
decoding), the seed's re-creation alone, and the bytes the hand-off adds on the
bus (the reference frame, against the raw batch and the payload).  CPU time is
the process's (x264's threads included), on this machine.

    python -m benchmarks.handoff_cost [CLIP] [--presets faster,medium] [--frames 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.rd import load_source
from shared.codecs import NativeCodec, decode_payload, read_header
from shared.codecs.reference import Reference
from shared.pixfmt import frame_size

MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"


def cpu_ms(fn):
    t = time.process_time()
    out = fn()
    return out, (time.process_time() - t) * 1000


def measure(src, preset: str, batch: int = 8, level: int = 4) -> dict:
    codec = NativeCodec("x264-psnr", reorder=True, preset=preset)
    w, h, fps = src.width, src.height, src.fps
    rows = {"closed_encode": [], "chained_encode": [], "closed_decode": [], "chained_decode": [], "seed": [],
            "closed_bytes": [], "chained_bytes": []}
    ref = None
    for k, s in enumerate(range(0, len(src.frames), batch)):
        frames = src.frames[s:s + batch]
        (closed, _), t_ce = cpu_ms(lambda: codec.encode_reconstruct(frames, w, h, fps, level))
        (chained, rec), t_he = cpu_ms(lambda: codec.encode_reconstruct(frames, w, h, fps, level, reference=ref))
        _, t_cd = cpu_ms(lambda: decode_payload(closed))
        _, t_hd = cpu_ms(lambda: decode_payload(chained, ref))
        if ref is not None:  # batch 0 has nothing to chain to
            header = read_header(chained)[0]
            _, t_seed = cpu_ms(lambda: NativeCodec("x264-psnr").seed_packet(header, ref))
            for key, v in (("closed_encode", t_ce), ("chained_encode", t_he), ("closed_decode", t_cd),
                           ("chained_decode", t_hd), ("seed", t_seed), ("closed_bytes", len(closed)),
                           ("chained_bytes", len(chained))):
                rows[key].append(v)
        ref = Reference(k, w, h, rec[-1])
    # What pinning the seeded batches to x264's SSE2 path costs: the same chained batches with every
    # instruction set this CPU has (a bitstream only this CPU model could re-create: timing only).
    unpinned = NativeCodec("x264-psnr", reorder=True, preset=preset, seed_isa="native")
    ref, pinned_ms, native_ms = None, [], []
    for k, s in enumerate(range(0, len(src.frames), batch)):
        frames = src.frames[s:s + batch]
        if ref is not None:
            native_ms.append(cpu_ms(lambda: unpinned.encode(frames, w, h, fps, level, reference=ref))[1])
            pinned_ms.append(cpu_ms(lambda: codec.encode(frames, w, h, fps, level, reference=ref))[1])
        ref = Reference(k, w, h, codec.encode_reconstruct(frames, w, h, fps, level, reference=ref)[1][-1])
    rows["pinned_encode"], rows["native_encode"] = pinned_ms, native_ms
    med = {k: float(np.median(v)) for k, v in rows.items()}
    ref_bytes = frame_size(w, h)
    return {
        "preset": preset, "batches": len(rows["seed"]),
        "worker_ms": {"closed": med["closed_encode"], "chained": med["chained_encode"],
                      "extra": med["chained_encode"] - med["closed_encode"]},
        "receiver_ms": {"closed": med["closed_decode"], "chained": med["chained_decode"],
                        "extra": med["chained_decode"] - med["closed_decode"], "seed": med["seed"]},
        "payload_bytes": {"closed": med["closed_bytes"], "chained": med["chained_bytes"]},
        "seed_pin_ms": {"sse2": med["pinned_encode"], "native": med["native_encode"],
                        "cost": med["pinned_encode"] / med["native_encode"] - 1},
        "bus_bytes_per_batch": {"reference": ref_bytes, "raw_batch": batch * ref_bytes,
                                "reference_vs_raw": ref_bytes / (batch * ref_bytes),
                                "reference_vs_chained_payload": ref_bytes / med["chained_bytes"]},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.handoff_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("clip", nargs="?", default=str(MEDIA / "call_screenshare_720p.mp4"))
    p.add_argument("--presets", default="faster,medium", help="x264 presets, comma-separated (default %(default)s)")
    p.add_argument("--frames", type=int, default=64, help="frames of the clip (default %(default)s)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    src = load_source(a.clip, a.frames, 1 << 16)
    results = [measure(src, preset) for preset in a.presets.split(",")]
    if a.json:
        print(json.dumps({"clip": Path(a.clip).name, "size": f"{src.width}x{src.height}", "results": results}))
        return 0
    print(f"{Path(a.clip).name} {src.width}x{src.height}, x264-psnr with reordering, median per batch of 8 "
          f"(CPU ms of this process, this machine)")
    for r in results:
        wk, rx, b = r["worker_ms"], r["receiver_ms"], r["bus_bytes_per_batch"]
        print(f"  preset {r['preset']}: worker encode+reconstruct {wk['closed']:.1f} closed / {wk['chained']:.1f} "
              f"chained ({wk['extra']:+.1f}); receiver decode {rx['closed']:.1f} / {rx['chained']:.1f} "
              f"({rx['extra']:+.1f}; seed alone {rx['seed']:.1f}); payload {r['payload_bytes']['closed']:.0f} / "
              f"{r['payload_bytes']['chained']:.0f} B")
        pin = r["seed_pin_ms"]
        print(f"    chained encode pinned to SSE2 {pin['sse2']:.1f} ms vs every instruction set {pin['native']:.1f} ms "
              f"({100 * pin['cost']:+.0f} %)")
        print(f"    hand-off on the bus: {b['reference']} B per batch = {100 * b['reference_vs_raw']:.1f} % of the "
              f"raw batch, {b['reference_vs_chained_payload']:.0f}x the chained payload")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
