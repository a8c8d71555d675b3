"""Payloads written by an earlier checkout still decode: the bitstream is a contract."""

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from shared.codecs import decode_payload  # noqa: E402
from shared.codecs.neural import load_coder  # noqa: E402
from shared.modelstore import DEFAULT_MODELS, model_path  # noqa: E402
from shared.quality import psnr  # noqa: E402
from tools.golden_payloads import GOLDEN, latent_digests  # noqa: E402

DEFAULT = DEFAULT_MODELS["neural"]
shipped = pytest.mark.skipif(not model_path(DEFAULT).exists(), reason="shipped model weights not present")


@shipped
def test_the_default_model_has_a_golden_payload():
    assert (GOLDEN / f"{DEFAULT}.aic").exists(), f"run: python tools/golden_payloads.py --model {DEFAULT}"


@pytest.mark.parametrize("meta_path", sorted(GOLDEN.glob("*.json")), ids=lambda p: p.stem)
def test_a_golden_payload_decodes_to_the_same_latents_and_the_same_picture(meta_path: Path):
    meta = json.loads(meta_path.read_text())
    if not model_path(meta["model"]).exists():
        pytest.skip(f"model {meta['model']} is no longer shipped")
    coder = load_coder(meta["model"], "cpu")
    assert coder.sha256 == meta["sha256"], "the weights changed under the same model name"
    payload = meta_path.with_suffix(".aic").read_bytes()
    # Entropy decoding and the integer hyper-synthesis are exact: the same bits on every machine.
    assert latent_digests(coder, payload) == meta["latents_sha256"]
    # The float synthesis is not bit-exact across CPUs: the picture must be the stored one up to
    # rounding (a changed colour path or synthesis lands far below 60 dB).
    _, frames = decode_payload(payload)
    assert psnr(np.load(meta_path.with_name(f"{meta['model']}.frames.npy")), frames) >= 60.0
