"""The hybrid codec: x264 carries the GOP, a learned network restores it; decoding is exact and fails cleanly."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from shared.codecs import CodecError, NativeCodec, create_codec, decode_payload, read_header  # noqa: E402
from shared.neural.restoration import Restorer, to_planes  # noqa: E402
from shared.pixfmt import split_planes  # noqa: E402
from tests.conftest import corrupted_payloads  # noqa: E402
from tests.test_neural import clip, decode_in_fresh_process  # noqa: E402

MODEL = "tiny-restore"


@pytest.fixture
def hybrid(tiny_model):  # tiny_model points AIC_MODELS_DIR at the tiny models
    return create_codec("hybrid", model=MODEL, device="cpu", threads=1)


def mse(a, b):
    return float(np.mean((a.astype(np.float64) - b) ** 2))


@pytest.mark.parametrize("n,w,h", [(1, 96, 64), (8, 96, 64), (16, 64, 48), (3, 97, 63)])
def test_a_fresh_process_decodes_the_encoders_own_reconstruction_bit_exactly(hybrid, tiny_models_dir, tmp_path,
                                                                             n, w, h):
    frames = clip(w + (w & 1), h + (h & 1), n)
    if (w, h) != (w + (w & 1), h + (h & 1)):
        from tests.test_codecs import crop

        frames = crop(frames, w + 1, h + 1, w, h)
    payload, recon = hybrid.encode_reconstruct(frames, w, h, 25.0, level=2)
    assert np.array_equal(decode_in_fresh_process(payload, tmp_path, str(tiny_models_dir)), recon)
    assert np.array_equal(decode_payload(payload)[1], recon)


def test_the_payload_is_the_base_gop_plus_one_blend_byte_per_frame(hybrid):
    frames = clip(n=8)
    payload, recon = hybrid.encode_reconstruct(frames, 96, 64, 25.0, level=3)
    base = NativeCodec("x264-psnr", threads=1).encode(frames, 96, 64, 25.0, level=3)
    header, bits = read_header(payload)
    assert header.codec == "hybrid" and header.params["level"] == 3 and header.params["crf"] == 29
    assert header.params["model"] == MODEL and header.params["base"] == "x264-psnr"
    assert bytes(bits[8:]) == bytes(read_header(base)[1])
    # Least-squares blend weights: never meaningfully worse than the native decode, frame by frame.
    native = decode_payload(base)[1]
    for src, n, r in zip(frames, native, recon):
        assert mse(src, r) <= mse(src, n) * 1.01 + 0.05


def test_frames_whose_blend_is_zero_are_the_native_decode_exactly(hybrid):
    frames = clip(n=4)
    payload = bytearray(hybrid.encode(frames, 96, 64, 25.0, level=5))
    start = len(payload) - len(read_header(bytes(payload))[1])
    payload[start : start + 4] = bytes(4)  # every weight 0
    native = decode_payload(NativeCodec("x264-psnr").encode(frames, 96, 64, 25.0, level=5))[1]
    assert np.array_equal(decode_payload(bytes(payload))[1], native)


def test_restoration_of_a_frame_does_not_depend_on_its_batch(hybrid):
    planes = to_planes(clip(n=8), 96, 64)
    restorer: Restorer = hybrid.model.restorer
    together = restorer.correction(planes, 4)
    for i in (0, 3, 7):
        assert torch.equal(restorer.correction(planes[i : i + 1], 4)[0], together[i])
    assert torch.equal(restorer.correction(planes, 4, only=[3])[3], together[3])


def test_decoding_is_the_same_whatever_the_thread_count(hybrid):
    payload, recon = hybrid.encode_reconstruct(clip(n=4), 96, 64, 25.0, level=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert np.array_equal(decode_payload(payload)[1], recon)
    finally:
        torch.set_num_threads(threads)


def test_a_receiver_without_the_model_or_with_other_weights_says_so(hybrid, tiny_models_dir, tmp_path, monkeypatch):
    payload = hybrid.encode(clip(n=1), 96, 64, 25.0)
    monkeypatch.setenv("AIC_MODELS_DIR", str(tmp_path))
    with pytest.raises(CodecError, match="not found"):
        decode_payload(payload)
    (tmp_path / MODEL).mkdir()
    (tmp_path / MODEL / "weights.pt").write_bytes((tiny_models_dir / MODEL / "weights.pt").read_bytes() + b"\0")
    with pytest.raises(CodecError, match="sha256"):
        decode_payload(payload)


def test_thousand_random_corruptions_each_decode_or_raise_codec_error(hybrid):
    payload = hybrid.encode(clip(w=64, h=48, n=8), 64, 48, 25.0, level=4)
    outcomes = {"ok": 0, "error": 0}
    for p in corrupted_payloads(payload, 1000, seed=2):
        try:
            _, frames = decode_payload(p)
            assert frames.shape == (8, 64 * 48 * 3 // 2) and frames.dtype == np.uint8
            outcomes["ok"] += 1
        except CodecError:
            outcomes["error"] += 1
    assert outcomes["ok"] + outcomes["error"] == 1000
    assert outcomes["error"] > 300


def test_the_level_picks_the_x264_crf_and_more_levels_cost_more_bits(hybrid):
    frames = clip(n=8)
    sizes = [len(hybrid.encode(frames, 96, 64, 25.0, level=k)) for k in (0, 4, 7)]
    assert sizes == sorted(sizes)
    with pytest.raises(CodecError, match="level"):
        hybrid.encode(frames, 96, 64, 25.0, level=8)


def test_luma_and_chroma_planes_round_trip_through_the_network_layout():
    from shared.neural.restoration import from_planes
    from shared.pixfmt import frame_size

    for w, h in ((97, 63), (64, 48), (2, 2)):
        frames = np.random.default_rng(0).integers(0, 256, (3, frame_size(w, h)), dtype=np.uint8)
        assert np.array_equal(from_planes(to_planes(frames, w, h), w, h), frames)
        assert split_planes(frames[0], w, h)[0].shape == (h, w)


@pytest.fixture
def chained_hybrid(tiny_model):
    return create_codec("hybrid", model=MODEL, device="cpu", threads=1, hand_off=True, reorder=True)


def test_a_chained_hybrid_decodes_exactly_from_the_base_frame_the_receiver_holds(chained_hybrid, tiny_models_dir,
                                                                                 tmp_path):
    from shared.codecs.reference import Reference

    frames = clip(n=24)
    ref, sizes = None, []
    for k in range(3):
        batch = frames[8 * k:8 * k + 8]
        payload, recon = chained_hybrid.encode_reconstruct(batch, 96, 64, 25.0, level=3, reference=ref)
        header, decoded = decode_payload(payload, ref)
        assert np.array_equal(decoded, recon) and ("chain" in header.params) == (k > 0)
        # The frame handed on is the base layer's decode, which the next seed is re-created from.
        base_header = read_header(payload)[0]
        assert bytes(read_header(payload)[1][7:8]) == b"\0"  # the last frame's blend weights are zero
        assert base_header.params["base"] == "x264-psnr"
        sizes.append(len(payload))
        ref = Reference(k, 96, 64, decoded[-1])
    closed = [len(create_codec("hybrid", model=MODEL, device="cpu", threads=1, reorder=True).encode(
        frames[8 * k:8 * k + 8], 96, 64, 25.0, level=3)) for k in range(3)]
    assert sizes[0] == pytest.approx(closed[0], rel=0.05) and sum(sizes[1:]) < 0.9 * sum(closed[1:])


def test_a_chained_hybrid_payload_without_its_reference_is_a_clear_error(chained_hybrid):
    from shared.codecs.reference import Reference, ReferenceMismatch

    frames = clip(n=16)
    first, recon = chained_hybrid.encode_reconstruct(frames[:8], 96, 64, 25.0, level=3)
    second = chained_hybrid.encode(frames[8:], 96, 64, 25.0, level=3, reference=Reference(0, 96, 64, recon[-1]))
    with pytest.raises(ReferenceMismatch, match="batch 0"):
        decode_payload(second)
    with pytest.raises(ReferenceMismatch):
        decode_payload(second, Reference(0, 96, 64, recon[-2]))


def test_a_closed_gop_hybrid_takes_no_reference(hybrid):
    from shared.codecs.reference import Reference

    frames = clip(n=8)
    with pytest.raises(CodecError, match="closed GOPs"):
        hybrid.encode(frames, 96, 64, 25.0, reference=Reference(0, 96, 64, frames[0]))
