"""The codec policy: the neural payload goes out only when it is at least as good, and every
fallback is named in the row."""

from dataclasses import replace

import pytest

from services.compressor.policy import Policy
from services.compressor.worker import process_batch
from services.ingest import read_batches
from shared.codecs import Codec, NativeCodec, create_codec
from shared.codecs.native import LEVEL_CRF
from shared.config import CompressorConfig, PolicyConfig
from shared.schemas import unpack_batch_metrics

CFG = CompressorConfig(codec="x264", quality_frames=1, quality_every=1)


@pytest.fixture(scope="module")
def batch():
    return next(read_batches("lavfi:testsrc2=size=128x96:rate=25", "pol", 4, 4))


def row(policy: Policy, fb):
    out = process_batch(fb.pack(), policy, CFG)
    # The row survives the wire format, new fields included.
    return unpack_batch_metrics(out.metrics.pack()), out


@pytest.fixture
def neural(tiny_model):
    return create_codec("neural", model=tiny_model, device="cpu")  # untrained: poor quality, many bytes


def test_below_the_quality_target_native_goes_out_meeting_it(neural, batch):
    r, out = row(Policy(neural, NativeCodec("x264"), PolicyConfig("psnr_y", 30.0, compare_every=0)), batch)
    assert (r.codec, r.fallback_reason) == ("x264", "quality")
    assert r.psnr_y >= 30 and "target" in r.reason
    assert out.compressed.codec == "x264"


class StandIn(Codec):
    """A stand-in for the neural codec that codes with x264 (so tests control its quality and size)."""

    name, version = "neural", 1

    def __init__(self):
        self.inner = NativeCodec("x264")

    def encode(self, *a, **kw):
        return self.inner.encode(*a, **kw)

    def encode_reconstruct(self, *a, **kw):
        return self.inner.encode_reconstruct(*a, **kw)

    def decode_bitstream(self, header, bitstream):
        return self.inner.decode_bitstream(header, bitstream)


class Bloated(StandIn):
    """x264's pictures, 10 kB more bytes."""

    def encode_reconstruct(self, *a, **kw):
        payload, decoded = super().encode_reconstruct(*a, **kw)
        return payload + bytes(10_000), decoded


def test_on_sampled_batches_a_smaller_native_payload_at_matched_quality_goes_out(batch):
    policy = Policy(Bloated(), NativeCodec("x264"), PolicyConfig("psnr_y", 0.0, compare_every=1), level=4)
    r, _ = row(policy, batch)
    assert (r.codec, r.fallback_reason) == ("x264", "size")
    assert r.baseline_bytes == r.compressed_bytes and "native" in r.reason
    # Matched quality on the fine CRF grid: the stand-in coded at level 4 (CRF 26), so native needs no lower CRF.
    crf = int(dict(kv.split("=") for kv in r.codec_params.split(","))["crf"])
    assert crf >= 26 and r.level is None


def test_the_untrained_model_goes_out_when_nothing_forbids_it(neural, batch):
    r, _ = row(Policy(neural, NativeCodec("x264"), PolicyConfig("psnr_y", 0.0, compare_every=0)), batch)
    assert (r.codec, r.fallback_reason, r.baseline_bytes) == ("neural", None, None)
    assert r.level == 4  # the neural codec's default level


def test_a_neural_path_over_its_latency_budget_falls_back(neural, batch):
    r, _ = row(Policy(neural, NativeCodec("x264"), PolicyConfig("psnr_y", 0.0, 0, latency_budget_ms=0.001)), batch)
    assert (r.codec, r.fallback_reason) == ("x264", "latency")


class Broken(StandIn):
    def encode_reconstruct(self, *a, **kw):
        raise RuntimeError("CUDA error: out of memory")


def test_a_neural_error_falls_back_and_says_which(batch):
    r, _ = row(Policy(Broken(), NativeCodec("x264"), PolicyConfig("psnr_y", 30.0)), batch)
    assert (r.codec, r.fallback_reason, r.status) == ("x264", "error", "ok")
    assert "out of memory" in r.reason


class SameAsNative(StandIn):
    """Byte for byte the payload native's matched-quality search finds (x264 at the level's CRF)."""

    def encode_reconstruct(self, frames, w, h, fps, level=None):
        return self.inner.encode_reconstruct(frames, w, h, fps, crf=LEVEL_CRF["x264"][level])


def test_a_neural_payload_that_meets_everything_goes_out_with_its_baseline(batch):
    # testsrc2's PSNR-Y falls strictly with the CRF, so native's cheapest payload at matched quality is this one.
    policy = Policy(SameAsNative(), NativeCodec("x264"), PolicyConfig("psnr_y", 20.0, compare_every=2), level=5)
    sampled, _ = row(policy, batch)
    assert (sampled.codec, sampled.fallback_reason) == ("neural", None)
    assert sampled.baseline_bytes == sampled.compressed_bytes  # native must be strictly smaller to win
    unsampled, _ = row(policy, replace(batch, batch_seq=1))
    assert unsampled.baseline_bytes is None and unsampled.fallback_reason is None


def test_without_a_neural_codec_native_goes_out_with_no_fallback(batch):
    r, _ = row(Policy(None, NativeCodec("x264"), PolicyConfig(), level=2), batch)
    assert (r.codec, r.level, r.fallback_reason, r.baseline_bytes) == ("x264", 2, None, None)


@pytest.mark.parametrize("spec", ["psnr:30", "ssim", "ms_ssim:2"])
def test_bad_targets_are_clear_errors(spec):
    with pytest.raises(ValueError):
        metric, value = PolicyConfig.parse_target(spec)
        PolicyConfig(metric, value)


def test_after_native_wins_a_sample_the_stream_stays_native_until_the_next_sample(batch):
    policy = Policy(Bloated(), NativeCodec("x264"), PolicyConfig("psnr_y", 0.0, compare_every=4), level=4)
    first, _ = row(policy, batch)
    assert (first.codec, first.fallback_reason) == ("x264", "size")
    for seq in (1, 3):
        r, _ = row(policy, replace(batch, batch_seq=seq))
        assert (r.codec, r.fallback_reason, r.level, r.baseline_bytes) == ("x264", "size", first.level, None)
        assert r.codec_params == first.codec_params  # at the rate that won the sample
        assert "sampled batch 0" in r.reason
    other, _ = row(policy, replace(batch, stream_id="other", batch_seq=1))
    assert other.codec == "neural"  # another stream has no verdict yet
    resample, _ = row(policy, replace(batch, batch_seq=4))
    assert resample.baseline_bytes is not None  # the next sample decides afresh


def test_the_hybrid_codec_goes_out_when_native_needs_more_bytes_for_its_quality(tiny_model, batch):
    # testsrc2 is a chart with sharp edges: x264's psychovisual tuning spends bits that PSNR does not reward,
    # so x264 needs more bytes than the hybrid's PSNR-tuned base layer for the same PSNR-Y.
    hybrid = create_codec("hybrid", model="tiny-restore", device="cpu")
    policy = Policy(hybrid, NativeCodec("x264"), PolicyConfig("psnr_y", 20.0, compare_every=1), level=3)
    r, out = row(policy, batch)
    assert (r.codec, r.level, r.fallback_reason) == ("hybrid", 3, None)
    assert "model=tiny-restore" in r.codec_params and "base=x264-psnr" in r.codec_params
    assert r.baseline_bytes > r.compressed_bytes == len(out.compressed.payload)


def test_a_budget_caps_every_batch_natively_at_the_best_crf_that_fits(batch):
    from services.compressor.controls import Decision

    limit_kbps = 150.0
    limit = int(limit_kbps * 1000 / 8 * batch.frame_count / batch.fps)
    policy = Policy(None, NativeCodec("x264"), PolicyConfig(), level=7)
    out = process_batch(batch.pack(), policy, CFG, controls=_Fixed(Decision(None, None, None, limit_kbps)))
    r = out.metrics
    assert len(out.compressed.payload) <= limit and r.budget_kbps == limit_kbps and "to fit 150 kbps" in r.reason
    crf = int(dict(kv.split("=") for kv in r.codec_params.split(","))["crf"])
    one_less = NativeCodec("x264").encode(batch.frames, batch.width, batch.height, batch.fps, crf=crf - 1)
    assert len(one_less) > limit  # the best quality that fits, not just any
    starved = process_batch(batch.pack(), policy, CFG, controls=_Fixed(Decision(None, None, None, 5.0))).metrics
    assert "crf=51" in starved.codec_params and "does not fit" in starved.reason  # said, never silent


def test_under_a_budget_the_learned_codec_steps_down_its_levels_before_native(tiny_model, batch):
    from services.compressor.controls import Decision

    hybrid = create_codec("hybrid", model="tiny-restore", device="cpu")
    sizes = {lv: len(hybrid.encode(batch.frames, batch.width, batch.height, batch.fps, lv)) for lv in (2, 6)}
    budget = sizes[2] * 8 / (batch.frame_count / batch.fps) / 1000 * 1.01  # level 2 fits, level 6 does not
    policy = Policy(hybrid, NativeCodec("x264"), PolicyConfig("psnr_y", 0.0, compare_every=0), level=6)
    r = process_batch(batch.pack(), policy, CFG, controls=_Fixed(Decision(None, None, None, budget))).metrics
    assert r.codec == "hybrid" and r.level <= 2 and r.fallback_reason is None and r.compressed_bytes <= sizes[2]


class _Fixed:
    """Controls that decide the same for every batch."""

    def __init__(self, decision):
        self.decision = decision

    def decide(self, stream_id):
        return self.decision

    def observe(self, *a, **kw):
        pass


class SlowStandIn(StandIn):
    """A model that takes 0.3 s a batch and, like the real ones, codes one batch at a time."""

    def __init__(self):
        super().__init__()
        import threading

        self.lock = threading.Lock()

    def encode_reconstruct(self, *a, **kw):
        import time

        with self.lock:
            time.sleep(0.3)
            return super().encode_reconstruct(*a, **kw)


def test_waiting_behind_another_batch_is_not_counted_as_coding_time(batch):
    """Two batches at once on one model: the second waits 0.3 s, then codes in 0.3 s, within a
    0.5 s latency budget; neither may fall back for latency."""
    from concurrent.futures import ThreadPoolExecutor

    policy = Policy(SlowStandIn(), NativeCodec("x264"), PolicyConfig("psnr_y", 20.0, 0, latency_budget_ms=500))
    with ThreadPoolExecutor(2) as pool:
        coded = list(pool.map(lambda fb: policy.code(fb), [batch, replace(batch, batch_seq=batch.batch_seq + 1)]))
    assert [c.fallback_reason for c in coded] == [None, None]


def test_the_costly_metrics_are_measured_on_one_batch_in_quality_every_and_psnr_y_on_all(batch):
    cfg = CompressorConfig(codec="x264", quality_frames=1, quality_every=4)
    policy = Policy(None, NativeCodec("x264"), PolicyConfig())
    rows = {seq: process_batch(replace(batch, batch_seq=seq).pack(), policy, cfg).metrics for seq in (3, 4, 5, 8)}
    assert all(r.psnr_y > 30 for r in rows.values())
    assert [seq for seq, r in rows.items() if r.ms_ssim is not None] == [4, 8]
    assert all((r.psnr_rgb is None) == (r.ms_ssim is None) for r in rows.values())
