"""What the learned codec's colour conversion costs on its own, before any coding.

    python -m benchmarks.colour_roundtrip $(cat data/photos/val.txt)

For each source (images scaled to a 1024-pixel long side as ``aic bench rd``
does): yuv420p → RGB → yuv420p through swscale's 8-bit RGB (codec version 1)
and through the float path of :mod:`shared.neural.colour` (version 2), and the
PSNR-Y and PSNR-RGB of each round trip against the source.
"""

from __future__ import annotations

import argparse

import av
import numpy as np

from benchmarks.rd import load_source, unique_names
from shared.neural.colour import rgb_to_yuv420, yuv420_to_rgb
from shared.pixfmt import from_video_frame, split_planes, to_rgb
from shared.quality import psnr


def swscale_roundtrip(frame: np.ndarray, w: int, h: int) -> np.ndarray:
    rgb = to_rgb(frame, w, h)
    return from_video_frame(av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="+")
    ap.add_argument("--max-side", type=int, default=1024)
    a = ap.parse_args(argv)
    print(f"{'source':44} {'swscale Y':>10} {'RGB':>7} {'float Y':>9} {'RGB':>7}  (PSNR dB of the round trip alone)")
    for path, name in zip(a.sources, unique_names(a.sources)):
        src = load_source(path, 1, a.max_side)
        f, w, h = src.frames[0], src.width, src.height
        row = []
        for back in (swscale_roundtrip(f, w, h), rgb_to_yuv420(yuv420_to_rgb(f[None], w, h))[0]):
            row += [psnr(split_planes(f, w, h)[0], split_planes(back, w, h)[0]), psnr(to_rgb(f, w, h), to_rgb(back, w, h))]
        print(f"{name:44} {row[0]:10.2f} {row[1]:7.2f} {row[2]:9.2f} {row[3]:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
