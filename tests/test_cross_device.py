"""A payload coded on a GPU decodes on a CPU: the same latents, bit for bit, and the same picture up
to float rounding in the synthesis.  Runs where torch sees a CUDA device (skipped elsewhere):

    python -m pytest tests/test_cross_device.py

``AIC_ENCODE_DEVICE`` picks the encoding device (default ``cuda``; ``cpu`` checks the test itself).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from services.ingest import read_batches  # noqa: E402
from shared.codecs import read_header  # noqa: E402
from shared.codecs.neural import NeuralCodec, decode_neural  # noqa: E402
from shared.modelstore import DEFAULT_MODELS, model_path  # noqa: E402
from shared.neural.coder import pad_to  # noqa: E402
from shared.neural.colour import yuv420_to_rgb  # noqa: E402
from shared.pixfmt import crop_frame  # noqa: E402
from shared.quality import psnr  # noqa: E402
from tools.golden_payloads import latent_digests  # noqa: E402

ENCODER = os.environ.get("AIC_ENCODE_DEVICE", "cuda")

pytestmark = [
    pytest.mark.skipif(ENCODER.startswith("cuda") and not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not model_path(DEFAULT_MODELS["neural"]).exists(), reason="shipped weights not present"),
]


@pytest.mark.parametrize("width, height, frames", [(96, 64, 1), (97, 67, 8), (1280, 720, 2)])
def test_a_payload_coded_on_the_gpu_decodes_on_the_cpu(width, height, frames):
    # Odd sizes by cropping a larger even source (lavfi rounds its own sizes to even).
    fb = next(read_batches(f"lavfi:testsrc2=size={width + width % 2}x{height + height % 2}:rate=25", "xdev", frames, frames))
    batch = np.stack([crop_frame(f, fb.width, fb.height, width, height) for f in fb.frames])
    gpu, cpu = NeuralCodec(device=ENCODER), NeuralCodec(device="cpu")
    payload, gpu_recon = gpu.encode_reconstruct(batch, width, height, 25.0, level=4)

    # The entropy parameters come from integer arithmetic: both devices read the same latents.
    assert latent_digests(cpu.coder, payload) == latent_digests(gpu.coder, payload)
    header, bitstream = read_header(payload)
    cpu_frames = decode_neural(header, bitstream, "cpu")
    assert cpu_frames.shape == gpu_recon.shape
    # The float synthesis differs by rounding between devices (TF32 is off), far below coding noise.
    assert psnr(gpu_recon, cpu_frames) >= 50.0
    # So the quality a GPU worker reports in its metrics row is what a CPU receiver gets.
    assert abs(psnr(batch, gpu_recon) - psnr(batch, cpu_frames)) < 0.05


def test_the_gpu_encoders_own_latents_are_what_the_cpu_decoder_reads():
    batch = next(read_batches("lavfi:testsrc2=size=320x240:rate=25", "xdev", 2, 2)).frames
    gpu, cpu = NeuralCodec(device=ENCODER), NeuralCodec(device="cpu")
    x = pad_to(yuv420_to_rgb(batch, 320, 240), gpu.coder.net.stride)
    for i in range(len(batch)):
        y, z = gpu.coder.analyse(x[i : i + 1], 4)
        data, y_hat = gpu.coder.encode_latents(y, z)
        assert torch.equal(cpu.coder.decode_latents(data, cpu.coder.z_shape(240, 320)), y_hat)
