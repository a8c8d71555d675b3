"""Native codecs through PyAV (FFmpeg): x264, x265, VP9, AV1.

Each batch is coded with a fresh encoder.  Without a reference it is one
closed GOP that starts with a key frame and decodes alone.  With a
:class:`~shared.codecs.reference.Reference` (the previous batch's last decoded
frame), the codecs in :data:`CHAINABLE` code a *chained* batch: the encoder
sees the reference first, as a key frame that is not sent (the seed), and the
batch predicts from it; the receiver re-creates the seed from the frame it
holds (see :mod:`shared.codecs.reference`).  A stateless worker still needs
no history of its own: the reference comes with the batch.
"""

from __future__ import annotations

import contextlib
import os
import threading
from fractions import Fraction

import av
import numpy as np

from shared.codecs.base import Codec, CodecError, PayloadHeader, pack_payload, read_header
from shared.codecs.reference import ISA_LEVELS, ChainInfo, Reference, ReferenceMismatch, packet_digest
from shared.pixfmt import crop_frame, frame_size, from_video_frame, split_planes, to_video_frame

# SVT-AV1 prints its banner on stdout unless told otherwise.
os.environ.setdefault("SVT_LOG", "1")

# id -> (encoder, decoder, default options, quality option name)
NATIVE_CODECS: dict[str, tuple[str, str, dict[str, str], str]] = {
    "x264": ("libx264", "h264", {"preset": "veryfast", "tune": "zerolatency"}, "crf"),
    # The same speed, tuned for PSNR (no psychovisual rate-distortion, no adaptive quantization):
    # the base layer of the hybrid codec, whose restoration is trained for MSE too.
    "x264-psnr": ("libx264", "h264", {"preset": "veryfast", "tune": "zerolatency,psnr"}, "crf"),
    "x265": ("libx265", "hevc", {"preset": "veryfast", "tune": "zerolatency", "x265-params": "log-level=error"}, "crf"),
    "vp9": ("libvpx-vp9", "vp9", {"deadline": "realtime", "cpu-used": "8", "row-mt": "1", "lag-in-frames": "0"}, "crf"),
    "av1": ("libsvtav1", "libdav1d", {"preset": "10", "svtav1-params": "pred-struct=1"}, "crf"),
}
DEFAULT_CRF = {"x264": 23, "x264-psnr": 23, "x265": 26, "vp9": 36, "av1": 35}
# Rate levels, fewest bits first: the CRF each level stands for.
LEVEL_CRF = {
    "x264": (40, 36, 32, 29, 26, 23, 20, 17),
    "x264-psnr": (40, 36, 32, 29, 26, 23, 20, 17),
    "x265": (42, 38, 34, 31, 28, 25, 22, 19),
    "vp9": (60, 54, 48, 42, 36, 30, 24, 18),
    "av1": (60, 54, 48, 42, 36, 30, 24, 18),
}

#: x264 with tune=zerolatency codes one slice per thread, and its automatic thread count is the
#: number of cores, so the bitstream (and every rate figure against it) would depend on the machine:
#: 8 frames of camera_576p at level 4 take 39,980 B with 1 thread, 40,451 with 2, 42,942 with 8.
#: Two threads everywhere: the same bits on any machine (and what the 2-core VM measured), still
#: several hundred 720p frames/s.
ENCODER_THREADS = {"x264": 2, "x264-psnr": 2}

#: Coarsest CRF per encoder (libx264/libx265: 51; libvpx-vp9 and SVT-AV1: 63).
MAX_CRF = {"x264": 51, "x264-psnr": 51, "x265": 51, "vp9": 63, "av1": 63}


#: Codecs whose seed a receiver can re-create bit for bit (checked by tests, and across instruction
#: sets and thread counts for these three).  x265 and VP9 re-create their seed on one machine, but
#: whether their bitstreams depend on the CPU's instruction set is not established: they code closed
#: GOPs.
CHAINABLE = ("x264", "x264-psnr", "av1")
#: The seed key frame is coded with I-frame quantiser ratio 6 (about 15 QP finer than the P frames):
#: it is never sent, so its bits are free, and the batch that predicts from it starts from a picture
#: close to the reference itself: chained zerolatency x264 comes within 1-2 % of one continuous encoder
#: (docs/benchmarks.md, "Chained batches").
SEED_IPRATIO = 6.0
#: The key-frame interval of chained encoders: larger than any batch plus its seed.  It shapes the
#: bitstream's headers, so the receiver's seed encoder uses the same.
CHAIN_GOP = 1024
# The seed of the last batch this thread encoded: encode_reconstruct decodes with it instead of making it again.
_last_seed = threading.local()
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


class NativeCodec(Codec):
    """``reorder``: let x264 reorder and look ahead inside the batch (B-frames).  A batch is
    buffered before it is coded, so this adds no latency; zerolatency's promise of one frame in,
    one packet out buys nothing here.  mb-tree stays off, because with it the seed's bits would
    depend on the frames after it and the receiver could not re-create it."""

    version = 1

    def __init__(self, name: str = "x264", crf: int | None = None, preset: str | None = None, threads: int = 0,
                 reorder: bool = False, seed_isa: str = "sse2"):
        if name not in NATIVE_CODECS:
            raise ValueError(f"unknown native codec {name!r}")
        if seed_isa not in ISA_LEVELS:
            raise ValueError(f"seed_isa must be one of {sorted(ISA_LEVELS)}")
        self.name = name
        # x264's instruction sets for seeded batches: "sse2" (= its C output) re-creates on any CPU;
        # "native" only on the same CPU model (benchmarks time what the pin costs with it).
        self.seed_isa = seed_isa
        self.reorder = bool(reorder) and name.startswith("x264")
        self.encoder, self.decoder, opts, self._qopt = NATIVE_CODECS[name]
        self.crf = DEFAULT_CRF[name] if crf is None else int(crf)
        self.options = dict(opts)
        if preset is not None:
            self.options[self._preset_key] = str(preset)
        # 0 = the encoder decides, except where that changes the bits: see ENCODER_THREADS.
        self.threads = threads or ENCODER_THREADS.get(name, 0)

    @property
    def _preset_key(self) -> str:
        return "cpu-used" if self.name == "vp9" else "preset"  # libvpx names its speed knob so

    @property
    def chains(self) -> bool:
        """Whether this codec can code a batch against a reference (see :data:`CHAINABLE`)."""
        return self.name in CHAINABLE

    @property
    def params(self) -> dict:
        return {"crf": self.crf, **{k: v for k, v in self.options.items() if k in ("preset", "cpu-used")},
                **({"reorder": 1} if self.reorder else {})}

    @property
    def max_crf(self) -> int:
        """The coarsest CRF the encoder takes: what a tight budget may need."""
        return MAX_CRF[self.name]

    @property
    def crf_range(self) -> tuple[int, int]:
        """The CRFs the levels span, best quality first: finer rate steps for matching a quality."""
        return min(LEVEL_CRF[self.name]), max(LEVEL_CRF[self.name])

    def encode(self, frames: np.ndarray, width: int, height: int, fps: float, level: int | None = None,
               *, crf: int | None = None, reference: Reference | None = None, preset: str | None = None) -> bytes:
        """As :meth:`Codec.encode`; ``crf`` (keyword) overrides the level's CRF; with ``reference``
        (codecs in :data:`CHAINABLE`) the batch is chained to it; ``preset`` overrides the codec's
        speed preset for this batch (named in the header)."""
        with normal_scheduling():
            payload, seed = self._encode(frames, width, height, fps, level, crf, reference, preset)
        _last_seed.value = (payload, seed)
        return payload

    def encode_reconstruct(self, frames: np.ndarray, width: int, height: int, fps: float, level: int | None = None,
                           *, crf: int | None = None, reference: Reference | None = None,
                           preset: str | None = None) -> tuple[bytes, np.ndarray]:
        """(payload, what a receiver decodes).  The worker decodes its own seed and packets, which is
        what a receiver's re-created seed gives (tests hold the two to each other)."""
        payload = self.encode(frames, width, height, fps, level, crf=crf, reference=reference, preset=preset)
        header, bitstream = read_header(payload)
        last = getattr(_last_seed, "value", None)
        if "chain" not in header.params:
            seed = None
        elif last is not None and last[0] is payload:
            seed = last[1]
        else:  # encode was overridden: re-create the seed as a receiver would
            seed = self._verified_seed(header, reference)
        _last_seed.value = None
        return payload, self._decode_packets(header, bitstream, seed)

    def _encode(self, frames, width, height, fps, level, crf, reference, preset=None) -> tuple[bytes, bytes | None]:
        n = frames.shape[0]
        if crf is None:
            crf = self.crf if level is None else LEVEL_CRF[self.name][self.check_level(level)]
        else:
            level = None
        if reference is not None:
            if not self.chains:
                raise CodecError(f"{self.name} cannot code a chained batch (chainable: {', '.join(CHAINABLE)})")
            if (reference.width, reference.height) != (width, height):
                raise CodecError(f"reference is {reference.width}x{reference.height}, the batch {width}x{height}")
        rate = Fraction(fps).limit_denominator(1001)
        chained = reference is not None or self.reorder
        lookahead = n if self.reorder else 0
        isa = self.seed_isa if self.name.startswith("x264") else "native"
        ctx = self._encoder(width, height, rate, crf, gop=CHAIN_GOP if chained else n, lookahead=lookahead,
                            threads=self.threads, seeded=reference is not None, isa=isa, preset=preset)
        packets: list[bytes] = []
        try:
            if reference is not None:
                packets += _encode_frame(ctx, reference.frame, width, height, 0, key=True)
            for i, frame in enumerate(frames, start=1 if reference is not None else 0):
                packets += _encode_frame(ctx, frame, width, height, i)
            packets += [bytes(p) for p in ctx.encode(None)]
        except av.FFmpegError as exc:
            raise CodecError(f"{self.encoder} failed: {exc}") from None
        params = {**self.params, "crf": crf, **({} if level is None else {"level": level})}
        if preset is not None:
            params[self._preset_key] = str(preset)
        seed = None
        if reference is not None:
            seed, packets = packets[0], packets[1:]
            params["chain"] = ChainInfo(
                batch=reference.batch, frame=reference.digest, seed=packet_digest(seed), threads=self.threads or 0,
                isa=isa, lookahead=lookahead, gop=CHAIN_GOP, fps=f"{rate.numerator}/{rate.denominator}",
            ).to_params()
        header = PayloadHeader(self.name, self.version, width, height, n, params=params)
        return pack_payload(header, b"".join(_with_size(p) for p in packets)), seed

    def _encoder(self, width: int, height: int, rate: Fraction, crf: int, *, gop: int, lookahead: int, threads: int,
                 seeded: bool, isa: str, preset: str | None) -> av.CodecContext:
        # 4:2:0 encoders need even sizes: pad by edge replication, crop at decode.
        ctx = av.CodecContext.create(self.encoder, "w")
        ctx.width, ctx.height, ctx.pix_fmt = width + (width & 1), height + (height & 1), "yuv420p"
        ctx.time_base = 1 / rate
        ctx.framerate = rate
        ctx.gop_size = gop
        ctx.max_b_frames = 0 if not lookahead else -1  # -1: the preset's choice
        ctx.thread_count = threads
        options = {**self.options, self._qopt: str(crf)}
        if preset is not None:
            options[self._preset_key] = str(preset)
        if self.name.startswith("x264"):
            x264 = []
            if lookahead:
                tune = ",".join(t for t in options.get("tune", "").split(",") if t and t != "zerolatency")
                options.pop("tune", None)
                if tune:
                    options["tune"] = tune
                x264 += [f"rc-lookahead={lookahead}", "mbtree=0"]
            if seeded:
                x264 += [f"ipratio={SEED_IPRATIO:g}"] + ([f"asm={ISA_LEVELS[isa]}"] if ISA_LEVELS[isa] else [])
            if x264:
                options["x264-params"] = ":".join(x264)
        ctx.options = options
        return ctx

    def seed_packet(self, header: PayloadHeader, reference: Reference, threads: int | None = None,
                    isa: str | None = None) -> bytes:
        """Re-create a chained payload's seed from the reference, with the settings its header names.
        ``threads`` and ``isa`` override them (tests: a receiver forced to another CPU path)."""
        info = ChainInfo.from_params(header.params["chain"])
        preset = str(header.params.get("preset", self.options.get("preset")))
        if self.name.startswith("x264") and preset not in X264_PRESETS or (
                self.name == "av1" and not (preset.isdigit() and 0 <= int(preset) <= 13)):
            raise CodecError(f"chained payload names an unknown {self.name} preset {preset!r}")
        try:
            crf = int(header.params["crf"])
        except (KeyError, TypeError, ValueError):
            raise CodecError("chained payload header lacks its CRF") from None
        if not 0 <= crf <= MAX_CRF[self.name]:
            raise CodecError(f"chained payload CRF {crf} out of range")
        num, den = (int(x) for x in info.fps.split("/"))
        with normal_scheduling():
            ctx = self._encoder(header.width, header.height, Fraction(num, den), crf, gop=info.gop,
                                lookahead=info.lookahead, threads=threads or info.threads, seeded=True,
                                isa=isa or info.isa, preset=preset)
            try:
                packets = _encode_frame(ctx, reference.frame, header.width, header.height, 0, key=True)
                packets += [bytes(p) for p in ctx.encode(None)]
            except av.FFmpegError as exc:
                raise CodecError(f"{self.encoder} could not re-create the seed: {exc}") from None
        if len(packets) != 1:
            raise CodecError(f"{self.encoder} made {len(packets)} packets of one seed frame")
        return packets[0]

    def decode_bitstream(self, header: PayloadHeader, bitstream: memoryview,
                         reference: Reference | None = None) -> np.ndarray:
        """Decode; a chained payload needs its ``reference`` (else :class:`ReferenceMismatch`)."""
        seed = None
        if "chain" in header.params:
            seed = self._verified_seed(header, reference)
        return self._decode_packets(header, bitstream, seed)

    def _verified_seed(self, header: PayloadHeader, reference: Reference | None) -> bytes:
        if not self.chains:
            raise CodecError(f"a {self.name} payload cannot be chained")
        info = ChainInfo.from_params(header.params["chain"])
        if reference is None:
            raise ReferenceMismatch(f"chained payload predicts from batch {info.batch}, and no reference is held",
                                    info.batch)
        if (reference.width, reference.height) != (header.width, header.height) or reference.digest != info.frame:
            raise ReferenceMismatch(f"chained payload predicts from batch {info.batch} ({info.frame[:8]}…), the "
                                    f"reference held is batch {reference.batch} ({reference.digest[:8]}…)", info.batch)
        seed = self.seed_packet(header, reference)
        if packet_digest(seed) != info.seed:
            raise ReferenceMismatch(f"the re-created seed differs from the encoder's ({self.encoder} build or "
                                    f"settings differ: {av.library_versions.get('libavcodec')})", info.batch)
        return seed

    def _decode_packets(self, header: PayloadHeader, bitstream: memoryview, seed: bytes | None) -> np.ndarray:
        width, height = header.width, header.height
        out = np.empty((header.frame_count, frame_size(width, height)), np.uint8)
        n = 0
        try:
            ctx = av.CodecContext.create(self.decoder, "r")
            ctx.thread_count = self.threads
            pictures = _decoded(ctx, ([seed] if seed is not None else []) + list(_packets(bitstream)))
            if seed is not None:
                next(pictures, None)  # the seed's picture is the reference, not a frame of this batch
            for vf in pictures:
                n = _store(out, n, vf, width, height)
        except av.FFmpegError as exc:
            raise CodecError(f"{self.decoder} could not decode the payload: {exc}") from None
        if n != header.frame_count:
            raise CodecError(f"bitstream held {n} frames, header promised {header.frame_count}")
        return out


@contextlib.contextmanager
def normal_scheduling():
    """Give the calling thread back its scheduling policy after an encoder changed it.

    SVT-AV1, when it can (as root), switches the thread that opens an encoder to SCHED_FIFO
    priority 99 and leaves it there.  Every process that thread forks afterwards inherits
    real-time priority: an embedded nats-server spinning at FIFO 99 on a 2-core machine starved
    everything else and hung the test suite.  The encoder's own threads still run real-time
    while it encodes; the caller does not stay so.
    """
    try:
        before = os.sched_getscheduler(0), os.sched_getparam(0)
    except (AttributeError, OSError):  # not Linux
        yield
        return
    try:
        yield
    finally:
        if (os.sched_getscheduler(0), os.sched_getparam(0)) != before:
            os.sched_setscheduler(0, before[0], before[1])


def _with_size(pkt: bytes) -> bytes:
    # Packets are length-prefixed so decoding needs no bitstream parser and
    # works the same for every codec (Annex B, IVF-less VP9, AV1 OBUs).
    return len(pkt).to_bytes(4, "big") + pkt


def _packets(bitstream: memoryview):
    pos, end = 0, len(bitstream)
    while pos < end:
        if pos + 4 > end:
            raise CodecError("bitstream truncated inside a packet length")
        size = int.from_bytes(bitstream[pos : pos + 4], "big")
        pos += 4
        if size == 0 or pos + size > end:
            raise CodecError("bitstream truncated inside a packet")
        yield bytes(bitstream[pos : pos + size])
        pos += size


def _store(out: np.ndarray, n: int, vf: av.VideoFrame, width: int, height: int) -> int:
    if n >= out.shape[0]:
        raise CodecError("bitstream holds more frames than its header says")
    if (vf.width, vf.height) != (width + (width & 1), height + (height & 1)):
        raise CodecError(f"decoded frame is {vf.width}x{vf.height}, header says {width}x{height}")
    if (vf.width, vf.height) == (width, height):
        from_video_frame(vf, out[n])
    else:
        out[n] = crop_frame(from_video_frame(vf), vf.width, vf.height, width, height)
    return n + 1


def _decoded(ctx: av.CodecContext, packets: list[bytes]):
    """Every picture a decoder gives for these packets, in display order, the buffered ones last."""
    for pkt in packets:
        yield from ctx.decode(av.Packet(pkt))
    yield from ctx.decode(None)


def _encode_frame(ctx: av.CodecContext, frame: np.ndarray, width: int, height: int, pts: int,
                  key: bool = False) -> list[bytes]:
    vf = to_video_frame(frame, width, height) if (ctx.width, ctx.height) == (width, height) else _padded(frame, width, height)
    vf.pts = pts
    if key:
        vf.pict_type = av.video.frame.PictureType.I
    return [bytes(p) for p in ctx.encode(vf)]


def _padded(frame: np.ndarray, width: int, height: int) -> av.VideoFrame:
    pw, ph = width + (width & 1), height + (height & 1)
    out = np.empty(frame_size(pw, ph), np.uint8)
    for src, dst in zip(split_planes(frame, width, height), split_planes(out, pw, ph)):
        dst[...] = np.pad(src, ((0, dst.shape[0] - src.shape[0]), (0, dst.shape[1] - src.shape[1])), mode="edge")
    return to_video_frame(out, pw, ph)
