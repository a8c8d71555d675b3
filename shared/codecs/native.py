"""Native codecs through PyAV (FFmpeg): x264, x265, VP9, AV1.

Each batch is coded with a fresh encoder, so it is one closed GOP that starts
with a key frame and decodes alone: a stateless worker needs no history.
"""

from __future__ import annotations

import contextlib
import os
from fractions import Fraction

import av
import numpy as np

from shared.codecs.base import Codec, CodecError, PayloadHeader, pack_payload
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


class NativeCodec(Codec):
    version = 1

    def __init__(self, name: str = "x264", crf: int | None = None, preset: str | None = None, threads: int = 0):
        if name not in NATIVE_CODECS:
            raise ValueError(f"unknown native codec {name!r}")
        self.name = name
        self.encoder, self.decoder, opts, self._qopt = NATIVE_CODECS[name]
        self.crf = DEFAULT_CRF[name] if crf is None else int(crf)
        self.options = dict(opts)
        if preset is not None:
            self.options["preset" if name != "vp9" else "cpu-used"] = str(preset)
        # 0 = the encoder decides, except where that changes the bits: see ENCODER_THREADS.
        self.threads = threads or ENCODER_THREADS.get(name, 0)

    @property
    def params(self) -> dict:
        return {"crf": self.crf, **{k: v for k, v in self.options.items() if k in ("preset", "cpu-used")}}

    @property
    def max_crf(self) -> int:
        """The coarsest CRF the encoder takes: what a tight budget may need."""
        return MAX_CRF[self.name]

    @property
    def crf_range(self) -> tuple[int, int]:
        """The CRFs the levels span, best quality first: finer rate steps for matching a quality."""
        return min(LEVEL_CRF[self.name]), max(LEVEL_CRF[self.name])

    def encode(self, frames: np.ndarray, width: int, height: int, fps: float, level: int | None = None,
               *, crf: int | None = None) -> bytes:
        """As :meth:`Codec.encode`; ``crf`` (keyword) overrides the level's CRF."""
        with normal_scheduling():
            return self._encode(frames, width, height, fps, level, crf)

    def _encode(self, frames, width, height, fps, level, crf) -> bytes:
        n = frames.shape[0]
        if crf is None:
            crf = self.crf if level is None else LEVEL_CRF[self.name][self.check_level(level)]
        else:
            level = None
        # 4:2:0 encoders need even sizes: pad by edge replication, crop at decode.
        pw, ph = width + (width & 1), height + (height & 1)
        ctx = av.CodecContext.create(self.encoder, "w")
        ctx.width, ctx.height, ctx.pix_fmt = pw, ph, "yuv420p"
        rate = Fraction(fps).limit_denominator(1001)
        ctx.time_base = 1 / rate
        ctx.framerate = rate
        ctx.gop_size = n
        ctx.max_b_frames = 0
        ctx.thread_count = self.threads
        ctx.options = {**self.options, self._qopt: str(crf)}
        out = bytearray()
        try:
            for i, frame in enumerate(frames):
                vf = to_video_frame(frame, width, height) if (pw, ph) == (width, height) else _padded(frame, width, height)
                vf.pts = i
                for pkt in ctx.encode(vf):
                    out += _with_size(bytes(pkt))
            for pkt in ctx.encode(None):
                out += _with_size(bytes(pkt))
        except av.FFmpegError as exc:
            raise CodecError(f"{self.encoder} failed: {exc}") from None
        header = PayloadHeader(self.name, self.version, width, height, n, params={**self.params, "crf": crf, **({} if level is None else {"level": level})})
        return pack_payload(header, bytes(out))

    def decode_bitstream(self, header: PayloadHeader, bitstream: memoryview) -> np.ndarray:
        width, height = header.width, header.height
        out = np.empty((header.frame_count, frame_size(width, height)), np.uint8)
        n = 0
        try:
            ctx = av.CodecContext.create(self.decoder, "r")
            ctx.thread_count = self.threads
            for pkt_bytes in _packets(bitstream):
                for vf in ctx.decode(av.Packet(pkt_bytes)):
                    n = _store(out, n, vf, width, height)
            for vf in ctx.decode(None):
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


def _padded(frame: np.ndarray, width: int, height: int) -> av.VideoFrame:
    pw, ph = width + (width & 1), height + (height & 1)
    out = np.empty(frame_size(pw, ph), np.uint8)
    for src, dst in zip(split_planes(frame, width, height), split_planes(out, pw, ph)):
        dst[...] = np.pad(src, ((0, dst.shape[0] - src.shape[0]), (0, dst.shape[1] - src.shape[1])), mode="edge")
    return to_video_frame(out, pw, ph)
