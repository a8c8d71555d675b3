"""The learned codec: real bitstreams that decode bit-exactly, anywhere, and fail cleanly."""

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from services.ingest import read_batches  # noqa: E402
from shared.codecs import CodecError, create_codec, decode_payload, read_header  # noqa: E402
from shared.codecs.neural import DEFAULT_MODEL, model_path  # noqa: E402
from shared.modelstore import DEFAULT_MODELS  # noqa: E402
from shared.neural.coder import ImageCoder  # noqa: E402
from shared.quality import psnr  # noqa: E402
from tests.conftest import corrupted_payloads  # noqa: E402


def clip(w=96, h=64, n=8):
    return next(read_batches(f"lavfi:testsrc2=size={w}x{h}:rate=25", "t", n, n)).frames


def decode_in_fresh_process(payload: bytes, tmp_path, env_models: str | None = None) -> np.ndarray:
    src = tmp_path / "payload.bin"
    out = tmp_path / "frames.npy"
    src.write_bytes(payload)
    code = ("import sys, numpy as np; from shared.codecs import decode_payload;"
            "np.save(sys.argv[2], decode_payload(open(sys.argv[1], 'rb').read())[1])")
    env = None
    if env_models:
        import os

        env = {**os.environ, "AIC_MODELS_DIR": env_models}
    subprocess.run([sys.executable, "-c", code, str(src), str(out)], check=True, env=env, timeout=120)
    return np.load(out)


@pytest.mark.parametrize("n,w,h", [(1, 96, 64), (8, 96, 64), (3, 97, 63), (1, 33, 17)])
def test_a_fresh_process_decodes_the_encoders_own_reconstruction_bit_exactly(any_tiny_model, tiny_models_dir,
                                                                             tmp_path, n, w, h):
    frames = clip(w + (w & 1), h + (h & 1), n)
    if (w, h) != (w + (w & 1), h + (h & 1)):
        from tests.test_codecs import crop

        frames = crop(frames, w + (w & 1), h + (h & 1), w, h)
    codec = create_codec("neural", model=any_tiny_model, device="cpu")
    payload, recon = codec.encode_reconstruct(frames, w, h, 25.0, level=3)
    decoded = decode_in_fresh_process(payload, tmp_path, str(tiny_models_dir))
    assert decoded.shape == frames.shape
    assert np.array_equal(decoded, recon)


def test_decoding_does_not_depend_on_what_else_was_in_the_batch(any_tiny_model):
    frames = clip(n=8)
    codec = create_codec("neural", model=any_tiny_model, device="cpu")
    _, together = decode_payload(codec.encode(frames, 96, 64, 25.0, level=5))
    for i in (0, 5):
        payload, alone_recon = codec.encode_reconstruct(frames[i : i + 1], 96, 64, 25.0, level=5)
        assert np.array_equal(decode_payload(payload)[1][0], alone_recon[0])
        # The same frame's latents, coded in a batch of 8, decode to the same picture within float noise.
        assert psnr(together[i], alone_recon[0]) > 45


def test_integer_hyper_synthesis_is_exact_across_batch_composition(tiny_model, tiny_models_dir):
    coder = ImageCoder(tiny_models_dir / tiny_model / "weights.pt")
    z = torch.randint(-6, 7, (5, coder.net.n, 3, 4)).double()
    mean, index = coder.hyper(z)
    for i in range(5):
        m1, i1 = coder.hyper(z[i : i + 1])
        assert torch.equal(m1[0], mean[i]) and torch.equal(i1[0], index[i])
    # ... and it follows the float network it was converted from.
    with torch.no_grad():
        fm, fs = coder.net.h_s(z.float()).chunk(2, dim=1)
    assert torch.allclose(mean, fm, atol=2e-3)
    picked = torch.from_numpy(coder.scales)[index.clamp(max=len(coder.scales) - 1)]
    inside = (fs > coder.scales[0]) & (fs < coder.scales[-1])
    assert torch.allclose(picked[inside].float(), fs[inside], rtol=0.06)


def test_payload_names_model_and_level_and_metrics_get_its_length(tiny_model):
    codec = create_codec("neural", model=tiny_model, device="cpu")
    payload = codec.encode(clip(n=2), 96, 64, 25.0, level=1)
    header, bitstream = read_header(payload)
    assert header.codec == "neural" and header.params["model"] == "tiny" and header.params["level"] == 1
    assert sum(header.params["sizes"]) == len(bitstream)
    assert len(header.params["sha256"]) == 16


def test_a_receiver_with_other_weights_says_so(tiny_model, tiny_models_dir, tmp_path, monkeypatch):
    payload = create_codec("neural", model=tiny_model, device="cpu").encode(clip(n=1), 96, 64, 25.0)
    other = tmp_path / "tiny"
    other.mkdir()
    weights = bytearray((tiny_models_dir / "tiny" / "weights.pt").read_bytes())
    (other / "weights.pt").write_bytes(bytes(weights) + b"\0")  # same model name, different file
    monkeypatch.setenv("AIC_MODELS_DIR", str(tmp_path))
    with pytest.raises(CodecError, match="sha256"):
        decode_payload(payload)


def test_level_out_of_range_is_a_clear_error(tiny_model):
    codec = create_codec("neural", model=tiny_model, device="cpu")
    with pytest.raises(CodecError, match="level"):
        codec.encode(clip(n=1), 96, 64, 25.0, level=99)


def test_thousand_random_corruptions_each_decode_or_raise_codec_error(any_tiny_model):
    codec = create_codec("neural", model=any_tiny_model, device="cpu")
    payload = codec.encode(clip(w=64, h=64, n=2), 64, 64, 25.0, level=4)
    outcomes = {"ok": 0, "error": 0}
    for p in corrupted_payloads(payload, 1000):
        try:
            _, frames = decode_payload(p)
            assert frames.dtype == np.uint8
            outcomes["ok"] += 1
        except CodecError:
            outcomes["error"] += 1
    assert outcomes["ok"] + outcomes["error"] == 1000
    assert outcomes["error"] > 500


def smooth_frame(w=128, h=128, seed=0) -> np.ndarray:
    """A deterministic smooth colour picture (sums of sinusoids) as one packed yuv420p frame."""
    import av

    from shared.pixfmt import from_video_frame

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    img = np.zeros((h, w, 3))
    for _ in range(6):
        fx, fy, ph = rng.uniform(0.5, 4), rng.uniform(0.5, 4), rng.uniform(0, 6.3)
        img += rng.uniform(0.2, 1, 3) * np.sin(2 * np.pi * (fx * xx + fy * yy) + ph)[..., None]
    rgb = (30 + 190 * (img - img.min()) / (img.max() - img.min())).astype(np.uint8)
    return from_video_frame(av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p"))[None]


shipped = pytest.mark.skipif(not model_path(DEFAULT_MODEL).exists(), reason="no shipped weights yet")


@shipped
def test_shipped_model_spends_more_bits_and_gains_quality_level_by_level(tmp_path):
    # Smooth content, like the photographs it was trained on (it codes synthetic test charts poorly).
    frames = smooth_frame()
    codec = create_codec("neural", device="cpu")
    sizes, quality = [], []
    for level in (0, 2, 4, 7):  # neighbouring levels may swap on a tiny image; these may not
        payload, recon = codec.encode_reconstruct(frames, 128, 128, 25.0, level)
        sizes.append(len(payload))
        quality.append(psnr(frames, recon))
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    assert quality == sorted(quality) and quality[-1] > quality[0] + 6
    assert np.array_equal(decode_in_fresh_process(payload, tmp_path), recon)


@shipped
def test_shipped_model_codes_at_the_rate_it_estimates():
    from shared.neural.export import estimated_bits

    frame = next(read_batches("lavfi:testsrc2=size=512x512:rate=25", "t", 1, 1)).frames
    coder = create_codec("neural", device="cpu").coder
    from shared.pixfmt import to_rgb

    x = torch.from_numpy(to_rgb(frame[0], 512, 512)).permute(2, 0, 1)[None].float() / 255
    for level in (0, 4, 7):
        streams, _ = coder.encode(x, level, reconstruct=False)
        coded = 8 * len(streams[0])
        assert abs(coded / estimated_bits(coder, x, level) - 1) < 0.02


def test_a_4k_frame_codes_and_decodes(tiny_model):
    w, h = 3840, 2160
    frames = clip(w, h, 1)
    codec = create_codec("neural", model=tiny_model, device="cpu")
    payload, recon = codec.encode_reconstruct(frames, w, h, 25.0, level=2)
    assert np.array_equal(decode_payload(payload)[1], recon)


def test_auto_codes_chained_x264_whether_or_not_learned_weights_are_present(tiny_models_dir, tmp_path, monkeypatch):
    # The learned codecs add nothing measurable on top of chained x264 (docs/benchmarks.md) and are
    # far slower; they stay one flag away.
    from services.compressor.worker import resolve_codec

    (tmp_path / "with" / DEFAULT_MODEL).mkdir(parents=True)
    (tmp_path / "with" / DEFAULT_MODEL / "weights.pt").symlink_to(tiny_models_dir / "tiny" / "weights.pt")
    monkeypatch.setenv("AIC_MODELS_DIR", str(tmp_path / "with"))
    assert resolve_codec("auto") == "x264-psnr"
    monkeypatch.setenv("AIC_MODELS_DIR", str(tmp_path / "without"))
    assert resolve_codec("auto") == "x264-psnr"
    assert resolve_codec("x265") == "x265" and resolve_codec("hybrid") == "hybrid"


def test_the_native_codec_behind_a_learned_one_is_the_best_for_the_target_metric():
    from services.compressor.worker import resolve_fallback
    from shared.config import CompressorConfig, PolicyConfig

    assert resolve_fallback(CompressorConfig()) == "x264-psnr"
    assert resolve_fallback(CompressorConfig(policy=PolicyConfig("psnr_rgb", 36.0))) == "x264-psnr"
    assert resolve_fallback(CompressorConfig(policy=PolicyConfig("ms_ssim", 0.98))) == "x264"
    assert resolve_fallback(CompressorConfig(fallback="av1")) == "av1"


def test_a_payload_of_another_codec_version_is_refused_clearly(tiny_model):
    from shared.codecs.base import pack_payload

    payload = create_codec("neural", model=tiny_model, device="cpu").encode(clip(n=1), 96, 64, 25.0)
    header, bitstream = read_header(payload)
    old = pack_payload(dataclasses.replace(header, codec_version=1), bytes(bitstream))
    with pytest.raises(CodecError, match="version 1"):
        decode_payload(old)
