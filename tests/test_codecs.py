"""Native codecs: payloads are self-describing and decode back to frames."""

import numpy as np
import pytest

from services.ingest import read_batches
from shared.codecs import CodecError, create_codec, decode_payload, read_header
from shared.pixfmt import crop_frame, frame_size
from shared.quality import psnr


def clip(w=96, h=64, n=8):
    return next(read_batches(f"lavfi:testsrc2=size={w}x{h}:rate=25", "t", n, n)).frames


@pytest.mark.parametrize("name", ["x264", "x264-psnr", "x265", "vp9", "av1"])
def test_native_round_trip_is_close_and_self_describing(name):
    frames = clip()
    payload = create_codec(name).encode(frames, 96, 64, 25.0)
    header, decoded = decode_payload(payload)
    assert (header.codec, header.width, header.height, header.frame_count) == (name, 96, 64, 8)
    assert decoded.shape == frames.shape
    assert psnr(frames, decoded) > 30


def crop(frames, w, h, cw, ch):
    return np.stack([crop_frame(f, w, h, cw, ch) for f in frames])


def test_odd_sizes_are_padded_and_cropped_back():
    frames = crop(clip(w=98, n=3), 98, 64, 97, 63)
    header, decoded = decode_payload(create_codec("x264", crf=10).encode(frames, 97, 63, 25.0))
    assert decoded.shape == frames.shape
    assert psnr(frames, decoded) > 38


def test_lower_crf_spends_more_bits():
    frames = clip()
    sizes = [len(create_codec("x264", crf=c).encode(frames, 96, 64, 25.0)) for c in (40, 28, 16)]
    assert sizes[0] < sizes[1] < sizes[2]


@pytest.mark.parametrize("cut", [0, 5, 12, 40, -1])
def test_truncated_payloads_raise_codec_error(cut):
    payload = create_codec("x264").encode(clip(), 96, 64, 25.0)
    with pytest.raises(CodecError):
        decode_payload(payload[:cut] if cut >= 0 else payload[:-7])


def test_random_corruptions_never_crash():
    payload = bytearray(create_codec("x264").encode(clip(n=2), 96, 64, 25.0))
    rng = np.random.default_rng(0)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(200):
        p = bytearray(payload)
        for i in rng.integers(0, len(p), 4):
            p[i] = rng.integers(0, 256)
        try:
            decode_payload(bytes(p))
            outcomes["ok"] += 1
        except CodecError:
            outcomes["error"] += 1
    assert sum(outcomes.values()) == 200


def test_header_rejects_foreign_bytes():
    with pytest.raises(CodecError):
        read_header(b"RIFF0000WAVEfmt ")


def test_x264_psnr_is_x264_at_the_same_speed_without_psychovisual_tuning():
    frames = clip()
    psy = read_header(create_codec("x264").encode(frames, 96, 64, 25.0, level=3))[1]
    plain = read_header(create_codec("x264-psnr").encode(frames, 96, 64, 25.0, level=3))[1]
    assert bytes(psy) != bytes(plain)
    assert create_codec("x264-psnr").options["preset"] == create_codec("x264").options["preset"] == "veryfast"


def test_measured_frame_rates_become_small_fractions_the_schema_accepts():
    from fractions import Fraction

    from services.ingest.gateway import frame_rate

    assert frame_rate(Fraction(29550583, 986000)) == Fraction(30000, 1001)  # a real clip's average rate
    assert frame_rate(Fraction(25)) == 25 and frame_rate(Fraction(60000, 1001)) == Fraction(60000, 1001)


def test_encoding_leaves_the_callers_scheduling_policy_alone():
    # SVT-AV1 switches the thread that opens it to SCHED_FIFO 99 when it may (root); children the
    # thread spawns later would inherit real-time priority (a spinning nats-server hung CI).
    import os

    before = os.sched_getscheduler(0), os.sched_getparam(0)
    for name in ("av1", "x264"):
        create_codec(name).encode(clip(n=2), 96, 64, 25.0)
        assert (os.sched_getscheduler(0), os.sched_getparam(0)) == before


@pytest.mark.parametrize("codec", ["x264", "hybrid", "neural"])
def test_a_header_that_promises_gigabytes_is_refused_before_decoding(codec):
    from shared.codecs.base import PayloadHeader, pack_payload

    forged = pack_payload(PayloadHeader(codec, 1, 7680, 4320, 256), b"\x00" * 64)
    with pytest.raises(CodecError, match="over the"):
        decode_payload(forged)


@pytest.mark.parametrize("name, coarsest", [("x264", 51), ("x265", 51), ("vp9", 63), ("av1", 63)])
def test_each_native_codec_codes_at_its_own_coarsest_crf(name, coarsest):
    """A tight budget may need the encoder's coarsest setting, which differs by encoder."""
    from shared.codecs import NativeCodec

    codec = NativeCodec(name)
    frames = np.random.default_rng(0).integers(0, 256, (2, frame_size(64, 48)), dtype=np.uint8)
    assert codec.max_crf == coarsest
    coarse = codec.encode(frames, 64, 48, 30.0, crf=coarsest)
    assert len(coarse) < len(codec.encode(frames, 64, 48, 30.0, crf=codec.crf_range[1]))
    assert decode_payload(coarse)[1].shape == frames.shape


def test_a_forged_neural_header_is_a_codec_error(tiny_model):
    from shared.codecs.base import PayloadHeader, pack_payload

    for params in ({"model": "", "sha256": "0" * 16, "level": 0, "sizes": [4]},
                   {"model": tiny_model, "sha256": "", "level": 0, "sizes": [4]}):  # fmt: skip
        with pytest.raises(CodecError):
            decode_payload(pack_payload(PayloadHeader("neural", 1, 64, 48, 1, params=params), b"\x01\x02\x03\x04"))


def test_the_neural_codec_refuses_to_encode_what_no_receiver_would_decode(tiny_model):
    from shared.codecs.neural import MAX_DECODE_PIXELS

    codec = create_codec("neural", model=tiny_model, device="cpu")
    w, h = 5120, 2880
    assert w * h > MAX_DECODE_PIXELS
    with pytest.raises(CodecError, match="limit"):
        codec.encode(np.zeros((1, frame_size(w, h)), np.uint8), w, h, 30.0)


def test_x264_codes_the_same_bits_whatever_the_machine():
    """Its slice count follows the thread count, which by default follows the cores: pinned."""
    from shared.codecs import NativeCodec

    frames = np.random.default_rng(0).integers(0, 256, (4, frame_size(320, 240)), dtype=np.uint8)
    codec = NativeCodec("x264")
    assert codec.threads == 2
    assert NativeCodec("x264", threads=2).encode(frames, 320, 240, 30.0) == codec.encode(frames, 320, 240, 30.0)
