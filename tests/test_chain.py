"""Chained batches: a batch predicts from the previous batch's last decoded frame, which is never
sent; the receiver re-creates the seed key frame from the frame it holds and decodes bit for bit."""

import dataclasses

import numpy as np
import pytest

from services.ingest import read_batches
from shared.codecs import CodecError, NativeCodec, decode_payload, read_header
from shared.codecs.base import pack_payload
from shared.codecs.native import CHAINABLE
from shared.codecs.reference import ChainInfo, Reference, ReferenceMismatch
from shared.pixfmt import crop_frame

W, H = 160, 96


def clip(n=32, w=W, h=H):
    return next(read_batches(f"lavfi:testsrc2=size={w}x{h}:rate=25", "t", n, n)).frames


def chain(codec, frames, batch=8, level=4, w=W, h=H):
    """Code ``frames`` in chained batches as a worker would: (payloads, reconstructions, references)."""
    ref, payloads, recs, refs = None, [], [], []
    for k, s in enumerate(range(0, len(frames), batch)):
        payload, rec = codec.encode_reconstruct(frames[s:s + batch], w, h, 25.0, level, reference=ref)
        payloads.append(payload)
        recs.append(rec)
        refs.append(ref)
        ref = Reference(k, w, h, rec[-1])
    return payloads, recs, refs


CONFIGS = [("x264", {}), ("x264-psnr", {}), ("x264-psnr", {"reorder": True, "preset": "medium"}), ("av1", {})]


@pytest.mark.parametrize("name,kw", CONFIGS, ids=[f"{n}{'-' + '-'.join(map(str, k.values())) if k else ''}"
                                                  for n, k in CONFIGS])
def test_a_receiver_holding_the_reference_decodes_exactly_what_the_worker_reconstructed(name, kw):
    frames = clip()
    payloads, recs, _ = chain(NativeCodec(name, **kw), frames)
    ref = None
    for k, (payload, rec) in enumerate(zip(payloads, recs)):
        # A fresh receiver-side codec each time: nothing but the payload and the held frame is shared.
        header, decoded = decode_payload(payload, ref)
        assert np.array_equal(decoded, rec), f"batch {k}"
        assert ("chain" in header.params) == (k > 0)
        ref = Reference(k, W, H, decoded[-1])


@pytest.mark.parametrize("name", CHAINABLE)
def test_chained_batches_cost_fewer_bits_than_closed_gops_at_the_same_level(name):
    frames = clip()
    codec = NativeCodec(name)
    chained = sum(map(len, chain(codec, frames)[0]))
    closed = sum(len(codec.encode(frames[s:s + 8], W, H, 25.0, 4)) for s in range(0, 32, 8))
    assert chained < 0.9 * closed


def test_the_seed_is_the_same_whatever_instruction_set_or_thread_count_the_receiver_has():
    # x264's SSE2 code and its plain C code give the same bits, so a seed pinned to "sse2" is re-created
    # on any CPU; the thread count comes from the header, not from the receiver's machine.
    w, h = 640, 352  # big enough that x264 uses both threads (it caps them by macroblock rows)
    frames = clip(16, w, h)
    payloads, _, refs = chain(NativeCodec("x264-psnr", reorder=True), frames, w=w, h=h)
    header, _ = read_header(payloads[1])
    worker_seed = ChainInfo.from_params(header.params["chain"]).seed
    from shared.codecs.reference import packet_digest

    on_c = NativeCodec("x264-psnr").seed_packet(header, refs[1], isa="c")
    assert packet_digest(on_c) == worker_seed
    receiver = NativeCodec("x264-psnr", threads=8)  # a receiver that would pick another thread count
    assert np.array_equal(receiver.decode_bitstream(header, read_header(payloads[1])[1], refs[1]),
                          decode_payload(payloads[1], refs[1])[1])
    # The thread count shapes the bitstream: which is why the header pins it.
    assert packet_digest(NativeCodec("x264-psnr").seed_packet(header, refs[1], threads=1)) != worker_seed


def test_a_chained_payload_without_its_reference_is_a_clear_error_naming_the_batch_it_needs():
    frames = clip(16)
    payloads, _, refs = chain(NativeCodec("x264"), frames)
    with pytest.raises(ReferenceMismatch, match="batch 0") as err:
        decode_payload(payloads[1])
    assert err.value.needed == 0
    other = Reference(0, W, H, frames[3])  # a frame the payload does not predict from
    with pytest.raises(ReferenceMismatch, match="reference held"):
        decode_payload(payloads[1], other)
    resized = Reference(0, W + 2, H, crop_frame(frames[0], W, H, W, H))
    with pytest.raises(ReferenceMismatch):
        decode_payload(payloads[1], resized)


def test_a_seed_that_re_creates_differently_is_refused_not_decoded_into_drift():
    frames = clip(16)
    payloads, _, refs = chain(NativeCodec("x264"), frames)
    header, bits = read_header(payloads[1])
    forged = dataclasses.replace(header, params={**header.params, "chain": {**header.params["chain"], "s": bytes(8)}})
    with pytest.raises(ReferenceMismatch, match="re-created seed differs"):
        decode_payload(pack_payload(forged, bytes(bits)), refs[1])


@pytest.mark.parametrize("change", [{"t": 999}, {"l": -1}, {"i": "avx512"}, {"r": "x"}, {"g": None},
                                    {"f": "not bytes"}])
def test_a_forged_chain_block_is_refused_before_any_encoder_runs(change):
    frames = clip(16)
    payloads, _, refs = chain(NativeCodec("x264"), frames)
    header, bits = read_header(payloads[1])
    forged = dataclasses.replace(header, params={**header.params, "chain": {**header.params["chain"], **change}})
    with pytest.raises(CodecError, match="chain"):
        decode_payload(pack_payload(forged, bytes(bits)), refs[1])


def test_codecs_that_cannot_chain_say_so():
    frames = clip(8)
    ref = Reference(0, W, H, frames[0])
    with pytest.raises(CodecError, match="cannot code a chained batch"):
        NativeCodec("vp9").encode(frames, W, H, 25.0, reference=ref)
    with pytest.raises(CodecError, match="reference is"):
        NativeCodec("x264").encode(frames, W, H, 25.0, reference=Reference(0, W + 2, H, frames[0]))


def test_a_batch_coded_at_another_preset_than_the_receiver_knows_decodes_from_its_header():
    # The worker picks a preset per batch (services/compressor/speed.py); the seed follows the header.
    frames = clip(16)
    codec = NativeCodec("x264-psnr", reorder=True)
    first, rec0 = codec.encode_reconstruct(frames[:8], W, H, 25.0, 4, preset="superfast")
    ref = Reference(0, W, H, rec0[-1])
    second, rec1 = codec.encode_reconstruct(frames[8:], W, H, 25.0, 4, reference=ref, preset="medium")
    assert read_header(second)[0].params["preset"] == "medium"
    assert np.array_equal(decode_payload(second, ref)[1], rec1)


def test_a_chain_block_on_a_codec_that_cannot_chain_is_refused_before_any_encoder_runs():
    frames = clip(16)
    payloads, _, refs = chain(NativeCodec("x264"), frames)
    header, bits = read_header(payloads[1])
    for codec in ("x265", "vp9", "neural", "hybrid"):
        forged = dataclasses.replace(header, codec=codec)
        with pytest.raises(CodecError, match="cannot be chained"):
            decode_payload(pack_payload(forged, bytes(bits)), refs[1])
