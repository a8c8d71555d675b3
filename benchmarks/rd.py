"""``aic bench rd``: rate–distortion of every codec on images and clips, side by side.

Each source is read as the pipeline sees it (yuv420p frames; images scaled so
the long side is at most ``--max-side``), coded by every codec at each of its
rate levels, decoded, and measured against the source: bits per pixel, kbps,
PSNR-Y, PSNR-RGB and MS-SSIM (all frames), encode and decode frames/s (this
machine, one run).  Video codecs code each batch of ``--gop`` frames as one
closed GOP, as the compressor does without a reference; JPEG and WebP code
every frame alone.  A codec spec may add options after colons:
``x264-psnr:chain`` chains the batches (each predicts from the previous
batch's last decoded frame, re-created at the decoder, see
shared.codecs.reference), ``:reorder`` lets x264 reorder inside the batch
(B-frames), ``:preset=medium`` picks the preset.  ``x264-cont`` is one
continuous x264 encoder over the whole clip (veryfast,
``tune=psnr,zerolatency``, no periodic key frame: what plain ffmpeg gives a
live stream) and ``x264-cont-bf`` the same with B-frames and mb-tree
(``tune=psnr``), for context.
Bits are the codec's bitstream; the aic container header is left out (for the
learned codec it holds the per-frame stream sizes, a few bytes that native codecs
carry inside their bitstream as packet lengths: ~0.1 % in the learned codec's favour).  BD-rates are against x264 (Bjøntegaard, cubic fit of
log-rate over the overlapping quality interval).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

from shared.codecs import LEARNED_CODECS, create_codec, decode_payload, learned_available, read_header
from shared.codecs.reference import Reference
from shared.modelstore import DEFAULT_MODELS
from shared.pixfmt import from_video_frame, to_video_frame
from shared.quality import measure_batch

VIDEO_CODECS = ("x264", "x264-psnr", "x265", "vp9", "av1")
#: One encoder over the whole clip: the anchors a user would run instead of aic (see the module doc).
CONTINUOUS = {"x264-cont": {"preset": "veryfast", "tune": "zerolatency,psnr"},
              "x264-cont-bf": {"preset": "veryfast", "tune": "psnr"}}
# Per-frame image codecs: quality points, fewest bits first.
IMAGE_POINTS = {"jpeg": (31, 20, 12, 8, 5, 3, 2), "webp": (5, 20, 40, 60, 75, 85, 95)}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


@dataclass
class Source:
    name: str
    frames: np.ndarray  # (n, frame_size) yuv420p
    width: int
    height: int
    fps: float
    is_image: bool


@dataclass
class Point:
    source: str
    codec: str
    level: int
    frames: int
    bpp: float
    kbps: float
    psnr_y: float
    psnr_rgb: float
    ms_ssim: float
    encode_fps: float
    decode_fps: float


def load_source(path: str, max_frames: int, max_side: int) -> Source:
    p = Path(path)
    is_image = p.suffix.lower() in IMAGE_SUFFIXES
    frames, fps = [], 25.0
    with av.open(path) as c:
        st = c.streams.video[0]
        if st.average_rate:
            fps = float(st.average_rate)
        for vf in c.decode(st):
            scale = min(1.0, max_side / max(vf.width, vf.height)) if is_image else 1.0
            w, h = (vf.width, vf.height) if scale == 1 else (round(vf.width * scale), round(vf.height * scale))
            frames.append(from_video_frame(vf.reformat(width=w, height=h, format="yuv420p", interpolation="AREA")))
            if is_image or len(frames) >= max_frames:
                break
    if not frames:
        raise ValueError(f"{path}: no video frames")
    return Source(p.name, np.stack(frames), w, h, fps, is_image)


def unique_names(paths: list[str]) -> list[str]:
    """File names, with as many parent folders as it takes to tell apart sources that share one."""
    parts = [Path(p).parts for p in paths]
    names = []
    for i, pp in enumerate(parts):
        depth = 1
        while depth < len(pp) and sum(q[-depth:] == pp[-depth:] for q in parts) > 1:
            depth += 1
        names.append("/".join(pp[-depth:]))
    return names


def image_codec_roundtrip(kind: str, q: int, frames: np.ndarray, w: int, h: int) -> tuple[int, np.ndarray, float, float]:
    """Code each frame alone as JPEG or WebP: (bytes, decoded frames, encode s, decode s)."""
    enc_name, dec_name, pix = ("mjpeg", "mjpeg", "yuvj420p") if kind == "jpeg" else ("libwebp", "webp", "yuv420p")
    out = np.empty_like(frames)
    nbytes, t_enc, t_dec = 0, 0.0, 0.0
    for i, f in enumerate(frames):
        t0 = time.perf_counter()
        ctx = av.CodecContext.create(enc_name, "w")
        ctx.width, ctx.height, ctx.pix_fmt, ctx.time_base = w, h, pix, Fraction(1, 25)
        if kind == "jpeg":
            ctx.qmin = ctx.qmax = q  # fixed quantizer scale, 2 (best) .. 31
        else:
            ctx.options = {"quality": str(q), "lossless": "0"}
        vf = _retag(to_video_frame(f, w, h), pix)
        pkts = list(ctx.encode(vf)) + list(ctx.encode(None))
        data = b"".join(bytes(p) for p in pkts)
        t1 = time.perf_counter()
        dctx = av.CodecContext.create(dec_name, "r")
        dec = list(dctx.decode(av.Packet(data))) + list(dctx.decode(None))
        out[i] = from_video_frame(_retag(dec[0], "yuv420p"))
        t2 = time.perf_counter()
        nbytes += len(data)
        t_enc += t1 - t0
        t_dec += t2 - t1
    return nbytes, out, t_enc, t_dec


def _retag(vf: av.VideoFrame, fmt: str) -> av.VideoFrame:
    """The same 4:2:0 samples under another format name, byte for byte (no range conversion).

    JPEG stores whatever samples it is given: the limited-range frames go in and
    come out unchanged, as ffmpeg's ``-strict -1`` yuv420p JPEGs do.
    """
    if vf.format.name == fmt:
        return vf
    out = av.VideoFrame(vf.width, vf.height, fmt)
    for src, dst in zip(vf.planes, out.planes):
        s = np.frombuffer(src, np.uint8).reshape(-1, src.line_size)
        d = np.frombuffer(dst, np.uint8).reshape(-1, dst.line_size)
        rows, cols = min(s.shape[0], d.shape[0]), min(src.width, dst.width)
        d[:rows, :cols] = s[:rows, :cols]
    return out


@dataclass(frozen=True)
class Spec:
    """A codec and how the benchmark drives it: ``name[:chain][:reorder][:preset=P]``."""

    codec: str
    chain: bool = False
    reorder: bool = False
    preset: str | None = None

    @classmethod
    def parse(cls, spec: str) -> "Spec":
        name, *opts = spec.split(":")
        kw: dict = {}
        for o in opts:
            key, _, value = o.partition("=")
            if key in ("chain", "reorder") and not value:
                kw[key] = True
            elif key == "preset" and value:
                kw["preset"] = value
            else:
                raise ValueError(f"codec spec {spec!r}: unknown option {o!r} (chain, reorder, preset=P)")
        if (kw.get("chain") or kw.get("reorder") or kw.get("preset")) and name not in (*VIDEO_CODECS, "hybrid"):
            raise ValueError(f"codec spec {spec!r}: options apply to native video codecs and hybrid only")
        return cls(name, **kw)

    def create(self, models: dict | None):
        if self.codec in CONTINUOUS:
            return ContinuousX264(self.codec)
        kw = {"model": models[self.codec]} if models and models.get(self.codec) else {}
        if self.reorder:
            kw["reorder"] = True
        if self.preset:
            kw["preset"] = self.preset
        if self.chain and self.codec == "hybrid":
            kw["hand_off"] = True  # its batches' last frames stay the base decode, the next seed's source
        return create_codec(self.codec, **kw)


class ContinuousX264:
    """One x264 encoder over the whole clip (the anchor): its bytes and decode, at each level's CRF."""

    levels = 8

    def __init__(self, name: str):
        from shared.codecs.native import LEVEL_CRF

        self.name, self.options, self.crfs = name, CONTINUOUS[name], LEVEL_CRF["x264"]

    def roundtrip(self, level: int, src: Source, crf: int | None = None) -> tuple[int, np.ndarray, float, float]:
        """(bytes, decoded frames, encode s, decode s) at a level's CRF, or at ``crf``."""
        from shared.codecs.native import ENCODER_THREADS

        rate = Fraction(src.fps).limit_denominator(1001)
        t0 = time.perf_counter()
        ctx = av.CodecContext.create("libx264", "w")
        ctx.width, ctx.height, ctx.pix_fmt = src.width, src.height, "yuv420p"
        ctx.time_base, ctx.framerate = 1 / rate, rate
        ctx.gop_size = 100_000  # no periodic key frame
        ctx.thread_count = ENCODER_THREADS["x264"]
        ctx.options = {**self.options, "crf": str(self.crfs[level] if crf is None else crf)}
        packets = []
        for i, f in enumerate(src.frames):
            vf = to_video_frame(f, src.width, src.height)
            vf.pts = i
            packets += [bytes(p) for p in ctx.encode(vf)]
        packets += [bytes(p) for p in ctx.encode(None)]
        t1 = time.perf_counter()
        dctx = av.CodecContext.create("h264", "r")
        dec = [from_video_frame(vf) for p in packets for vf in dctx.decode(av.Packet(p))]
        dec += [from_video_frame(vf) for vf in dctx.decode(None)]
        t2 = time.perf_counter()
        return sum(map(len, packets)), np.stack(dec), t1 - t0, t2 - t1


def codec_roundtrip(codec, level: int, src: Source, gop: int, chain: bool = False) -> tuple[int, np.ndarray, float, float]:
    """Code in batches of ``gop`` frames, closed GOPs or chained: (bitstream bytes, decoded frames,
    encode s, decode s)."""
    if isinstance(codec, ContinuousX264):
        return codec.roundtrip(level, src)
    out = np.empty_like(src.frames)
    nbytes, t_enc, t_dec = 0, 0.0, 0.0
    ref = None
    for k, start in enumerate(range(0, len(src.frames), gop)):
        batch = src.frames[start : start + gop]
        t0 = time.perf_counter()
        payload = codec.encode(batch, src.width, src.height, src.fps, level, **({"reference": ref} if chain else {}))
        t1 = time.perf_counter()
        _, dec = decode_payload(payload, ref)
        t2 = time.perf_counter()
        if chain:
            ref = Reference(k, src.width, src.height, dec[-1])
        out[start : start + len(batch)] = dec
        nbytes += len(read_header(payload)[1])
        t_enc += t1 - t0
        t_dec += t2 - t1
    return nbytes, out, t_enc, t_dec


def measure(src: Source, codec: str, level: int, nbytes: int, dec: np.ndarray, t_enc: float, t_dec: float) -> Point:
    q = measure_batch(src.frames, dec, src.width, src.height, sample=-1)
    n = len(src.frames)
    return Point(src.name, codec, level, n, 8 * nbytes / (n * src.width * src.height),
                 8 * nbytes / (n / src.fps) / 1000, q.psnr_y, q.psnr_rgb, q.ms_ssim, n / t_enc, n / t_dec)


def bd_rate(anchor: list[Point], test: list[Point], metric: str) -> float | None:
    """Bjøntegaard delta rate of ``test`` against ``anchor`` in % (negative: fewer bits), or None."""
    def curve(points):
        pts = sorted((_quality(p, metric), math.log(p.bpp)) for p in points
                     if p.bpp > 0 and not math.isnan(_quality(p, metric)))
        q = np.array([a for a, _ in pts])
        r = np.array([b for _, b in pts])
        keep = np.concatenate([[True], np.diff(q) > 1e-6])  # a fit needs distinct qualities
        return q[keep], r[keep]

    qa, ra = curve(anchor)
    qt, rt = curve(test)
    if len(qa) < 4 or len(qt) < 4:
        return None
    lo, hi = max(qa.min(), qt.min()), min(qa.max(), qt.max())
    if hi - lo < 0.1:
        return None
    pa, pt = np.polyfit(qa, ra, 3), np.polyfit(qt, rt, 3)
    ia, it = np.polyint(pa), np.polyint(pt)
    avg = ((np.polyval(it, hi) - np.polyval(it, lo)) - (np.polyval(ia, hi) - np.polyval(ia, lo))) / (hi - lo)
    return float((math.exp(avg) - 1) * 100)


def _quality(p: Point, metric: str) -> float:
    if metric == "ms_ssim":  # in dB, as is usual for fitting; none under 11 px (nan: no BD-rate)
        return math.nan if p.ms_ssim is None else -10 * math.log10(max(1e-10, 1 - p.ms_ssim))
    return getattr(p, metric)


def run(sources: list[str], codecs: list[str], frames: int, max_side: int, gop: int,
        models: dict[str, str] | None = None) -> dict:
    loaded = [load_source(s, frames, max_side) for s in sources]
    for src, name in zip(loaded, unique_names(sources)):
        src.name = name  # results are grouped by name: two photos called 2560x1600.jpg must stay apart
    jobs = []
    for src in loaded:
        for name in codecs:
            if name in IMAGE_POINTS:
                jobs += [(src, name, i, q) for i, q in enumerate(IMAGE_POINTS[name])]
            else:
                spec = Spec.parse(name)
                c = spec.create(models)
                jobs += [(src, name, lv, (c, spec.chain)) for lv in range(c.levels)]
    points: list[Point] = []
    for src, name, level, arg in tqdm(jobs, unit="point", disable=None, desc="rd"):
        if name in IMAGE_POINTS:
            nbytes, dec, te, td = image_codec_roundtrip(name, arg, src.frames, src.width, src.height)
        else:
            nbytes, dec, te, td = codec_roundtrip(arg[0], level, src, gop, chain=arg[1])
        points.append(measure(src, name, level, nbytes, dec, te, td))
    result = {"gop": gop, "frames_per_clip": frames, "max_side": max_side, "points": [asdict(p) for p in points]}
    for anchor in ANCHORS:
        if anchor in codecs:
            result[f"bd_rate_vs_{anchor}"] = bd_against(points, anchor)
    return result


ANCHORS = ("x264-cont", "x264", "jpeg")
BD_METRICS = ("psnr_y", "psnr_rgb", "ms_ssim")


def bd_against(points: list[Point], anchor: str) -> dict[str, dict[str, dict[str, float | None]]]:
    """{source: {codec: {metric: BD-rate % against ``anchor``}}} for PSNR-Y, PSNR-RGB and MS-SSIM."""
    out: dict = {}
    for s in dict.fromkeys(p.source for p in points):
        by = {c: [p for p in points if p.source == s and p.codec == c] for c in dict.fromkeys(p.codec for p in points)}
        out[s] = {c: {m: bd_rate(by[anchor], pts, m) for m in BD_METRICS}
                  for c, pts in by.items() if c != anchor}
    if len(out) > 1:  # the usual summary: the mean of per-source BD-rates
        codecs = dict.fromkeys(c for row in out.values() for c in row)
        out["mean"] = {c: {m: _mean([row[c][m] for row in out.values() if c in row]) for m in BD_METRICS}
                       for c in codecs}
        # A mean only covers the sources where the curves overlap (n/a elsewhere): say how many.
        out["mean_sources"] = {c: {m: sum(row[c][m] is not None for k, row in out.items() if k != "mean" and c in row)
                                   for m in BD_METRICS} for c in codecs}
    return out


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def print_tables(result: dict, out=sys.stdout) -> None:
    pts = [Point(**p) for p in result["points"]]
    for s in dict.fromkeys(p.source for p in pts):
        print(f"\n{s}", file=out)
        print(f"  {'codec':26} {'lvl':>3} {'bpp':>8} {'kbps':>9} {'PSNR-Y':>7} {'PSNR-RGB':>8} {'MS-SSIM':>8} "
              f"{'enc fps':>8} {'dec fps':>8}", file=out)
        for p in pts:
            if p.source == s:
                print(f"  {p.codec:26} {p.level:>3} {p.bpp:8.4f} {p.kbps:9.1f} {p.psnr_y:7.2f} {p.psnr_rgb:8.2f} "
                      f"{_fmt_ssim(p.ms_ssim)} {p.encode_fps:8.1f} {p.decode_fps:8.1f}", file=out)
    for anchor in ANCHORS:
        bd = result.get(f"bd_rate_vs_{anchor}")
        if not bd:
            continue
        print(f"\nBD-rate vs {anchor} (%, negative = fewer bits for the same quality), PSNR-Y / PSNR-RGB / MS-SSIM",
              file=out)
        counts = bd.get("mean_sources", {})
        for s, row in bd.items():
            if s == "mean_sources":
                continue
            cells = "\n    ".join(f"{c}: {_fmt(v.get('psnr_y'))} / {_fmt(v['psnr_rgb'])} / {_fmt(v['ms_ssim'])}"
                                  + (f" (of {counts[c]['psnr_rgb']} / {counts[c]['ms_ssim']} sources)"
                                     if s == "mean" and c in counts else "")
                                  for c, v in row.items())
            print(f"  {s}:\n    {cells}", file=out)


def _fmt_ssim(v: float | None) -> str:
    return f"{'n/a':>8}" if v is None else f"{v:8.5f}"


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.1f}"


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("aic bench rd: --plot needs matplotlib (pip install 'aic[bench]')") from None
    pts = [Point(**p) for p in result["points"]]
    sources = list(dict.fromkeys(p.source for p in pts))
    fig, axes = plt.subplots(1, len(sources), figsize=(5 * len(sources), 4), squeeze=False)
    for ax, s in zip(axes[0], sources):
        for c in dict.fromkeys(p.codec for p in pts):
            cp = sorted((p for p in pts if p.source == s and p.codec == c), key=lambda p: p.bpp)
            ax.plot([p.bpp for p in cp], [p.psnr_rgb for p in cp], marker="o", ms=3, label=c)
        ax.set_xscale("log")
        ax.set_title(s, fontsize=9)
        ax.set_xlabel("bits per pixel")
        ax.set_ylabel("PSNR-RGB (dB)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aic bench rd", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", help="image files and video clips")
    p.add_argument("--codecs", default=None,
                   help="comma list from hybrid,neural,x264,x264-psnr,x265,vp9,av1,jpeg,webp,x264-cont,x264-cont-bf; "
                        "a native video codec may add :chain, :reorder, :preset=P (default: all plain codecs; the "
                        "learned ones where their weights exist)")
    p.add_argument("--model", help=f"neural codec's model under models/ (default {DEFAULT_MODELS['neural']})")
    p.add_argument("--restore-model", help=f"hybrid codec's model under models/ (default {DEFAULT_MODELS['hybrid']})")
    p.add_argument("--frames", type=int, default=32, help="frames per clip (default %(default)s)")
    p.add_argument("--gop", type=int, default=8, help="frames per closed GOP = batch size (default %(default)s)")
    p.add_argument("--max-side", type=int, default=1024, help="images scaled to this long side (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of tables")
    p.add_argument("--save", type=Path, help="also write the JSON result to this file")
    p.add_argument("--plot", type=Path, help="write an RD plot (PSNR-RGB vs bpp) to this PNG")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    all_codecs = [c for c in LEARNED_CODECS if learned_available(c)] + [*VIDEO_CODECS, *IMAGE_POINTS]
    codecs = a.codecs.split(",") if a.codecs else all_codecs
    try:
        specs = [Spec.parse(c) for c in codecs if c not in IMAGE_POINTS]
    except ValueError as exc:
        raise SystemExit(f"aic bench rd: {exc}") from None
    unknown = {s.codec for s in specs} - {*LEARNED_CODECS, *VIDEO_CODECS, *CONTINUOUS}
    if unknown:
        raise SystemExit(f"aic bench rd: unknown codecs {sorted(unknown)}")
    for s in a.sources:
        if not Path(s).exists():
            raise SystemExit(f"aic bench rd: {s}: no such file")
    result = run(a.sources, codecs, a.frames, a.max_side, a.gop, {"neural": a.model, "hybrid": a.restore_model})
    if a.save:
        a.save.write_text(json.dumps(result, indent=1))
    if a.json:
        print(json.dumps(result))
    else:
        print_tables(result)
    if a.plot:
        plot(result, a.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
