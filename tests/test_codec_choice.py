"""Per stream, the chained native codec that needs fewer bytes at matched PSNR-Y codes it: a
challenger (``--try-codec``) is tried on 1 batch in ``try_every`` of a stream that is not live."""

from dataclasses import replace

import numpy as np
import pytest

from services.compressor.choice import CodecChoice
from services.compressor.handoff import Handed
from services.compressor.policy import Policy
from services.compressor.worker import Compressor, process_batch
from services.ingest import read_batches
from shared.codecs import NativeCodec, decode_payload
from shared.codecs.reference import Reference
from shared.config import CompressorConfig, PolicyConfig

CFG = CompressorConfig(codec="x264-psnr", quality_frames=0)
FAST = NativeCodec("x264-psnr", preset="ultrafast")  # many bytes for its quality
GOOD = NativeCodec("x264-psnr", preset="medium", reorder=True)  # far fewer (docs/benchmarks.md)


@pytest.fixture(scope="module")
def batches():
    return [replace(b, live=False) for b in read_batches("lavfi:testsrc2=size=160x96:rate=25", "try", 8, 40)]


def rows(policy, batches):
    """The batches' rows, coded as a chained stream: each batch predicts from the one before."""
    out, handed = [], Handed(None, "first")
    for b in batches:
        got = process_batch(b, policy, CFG, handed=handed)
        out.append(got.metrics)
        handed = Handed(Reference(b.batch_seq, b.width, b.height, got.handoff, 0), None)
    return out


def test_a_challenger_smaller_at_matched_quality_codes_the_stream_until_the_next_trial(batches):
    policy = Policy(None, FAST, PolicyConfig(), choice=CodecChoice(GOOD, every=4))
    got = rows(policy, batches)  # batches 0-4: the first is a key frame, the trial is batch 1
    assert [("preset=medium" in r.codec_params) for r in got] == [False, True, True, True, True]
    trial = got[1]
    assert trial.baseline_bytes > trial.compressed_bytes  # the loser's bytes, at matched PSNR-Y
    assert "trial" not in trial.reason and "<" in trial.reason and "ref=0" in trial.codec_params
    assert all("trial batch 1" in r.reason for r in got[2:5])


def test_a_challenger_that_needs_more_bytes_is_not_sent_and_the_row_says_by_how_much(batches):
    policy = Policy(None, GOOD, PolicyConfig(), choice=CodecChoice(FAST, every=4))
    got = rows(policy, batches[:5])
    assert all("preset=medium" in r.codec_params for r in got)
    assert got[1].baseline_bytes > got[1].compressed_bytes and "<=" in got[1].reason
    assert [r.baseline_bytes is None for r in got] == [True, False, True, True, True]  # trials only


def test_a_trial_slot_on_a_key_frame_is_skipped_so_intra_coding_never_decides(batches):
    policy = Policy(None, FAST, PolicyConfig(), choice=CodecChoice(GOOD, every=1))
    got = rows(policy, batches[:1])  # batch 0: a key frame
    assert got[0].baseline_bytes is None and "preset=ultrafast" in got[0].codec_params


def test_live_streams_are_not_tried(batches):
    policy = Policy(None, FAST, PolicyConfig(), choice=CodecChoice(GOOD, every=1))
    got = rows(policy, [replace(b, live=True) for b in batches[:2]])
    assert all("preset=ultrafast" in r.codec_params and r.baseline_bytes is None for r in got)


def test_a_stream_that_changes_codec_mid_chain_decodes_exactly_from_the_frame_the_receiver_holds(batches):
    ref, held = None, None
    for k, codec in enumerate([NativeCodec("x264-psnr"), NativeCodec("av1", preset="12"), NativeCodec("x264")]):
        payload, rec = codec.encode_reconstruct(batches[k].frames, 160, 96, 25.0, reference=ref)
        _, decoded = decode_payload(payload, held)
        assert np.array_equal(decoded, rec), codec.name
        ref = held = Reference(k, 160, 96, decoded[-1])


def test_only_a_native_codec_that_chains_can_be_tried():
    with pytest.raises(ValueError, match="chain"):
        Compressor(CompressorConfig(try_codec="x265"))
    with pytest.raises(ValueError, match="native"):
        Compressor(CompressorConfig(try_codec="hybrid"))
    worker = Compressor(CompressorConfig(try_codec="av1:6"))
    assert worker.policy.choice.challenger.name == "av1" and worker.policy.choice.challenger.options["preset"] == "6"
