"""Write the golden neural payload that tests/test_golden.py holds every later checkout to.

    python tools/golden_payloads.py [--model NAME]

A payload is a promise: one written today must decode the same way on any
machine and after any upgrade of torch or constriction.  The entropy-decoded
latents (integers, plus means from the integer hyper-synthesis) are exact by
design, so their sha256 is stored next to the payload; the float synthesis
after them is not bit-exact across CPUs, so the frames this machine decoded are
stored too and a later decode must match them within float noise.
Run this once per shipped model (a new default model needs its golden file).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np

from services.ingest import read_batches
from shared.codecs import create_codec, read_header
from shared.modelstore import DEFAULT_MODELS

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "golden"
SOURCE = "lavfi:testsrc2=size=96x64:rate=25"
LEVEL = 4


def latent_digests(coder, payload: bytes) -> list[str]:
    """sha256 of each frame's decoded y_hat (float32 bytes)."""
    header, bitstream = read_header(payload)
    shape = coder.z_shape(header.height, header.width)
    out, pos = [], 0
    for size in header.params["sizes"]:
        y_hat = coder.decode_latents(bytes(bitstream[pos : pos + size]), shape)
        out.append(hashlib.sha256(y_hat.numpy().tobytes()).hexdigest())
        pos += size
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODELS["neural"])
    a = ap.parse_args()
    frames = next(read_batches(SOURCE, "golden", 2, 2)).frames
    codec = create_codec("neural", model=a.model, device="cpu")
    payload, recon = codec.encode_reconstruct(frames, 96, 64, 25.0, LEVEL)
    GOLDEN.mkdir(parents=True, exist_ok=True)
    (GOLDEN / f"{a.model}.aic").write_bytes(payload)
    np.save(GOLDEN / f"{a.model}.frames.npy", recon)
    meta = {"model": a.model, "sha256": codec.coder.sha256, "source": SOURCE, "level": LEVEL,
            "latents_sha256": latent_digests(codec.coder, payload)}
    (GOLDEN / f"{a.model}.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {GOLDEN / a.model}.aic ({len(payload)} bytes), .frames.npy and .json")


if __name__ == "__main__":
    main()
