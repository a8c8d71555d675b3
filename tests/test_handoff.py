"""The reference hand-off on the bus: each stream's latest decoded frame, found by the next batch's
worker (its own copy first, the bus copy on failover), or the reason there is none."""

import time

import numpy as np
import pytest

from services.compressor.handoff import ReferenceStore, refs_subject
from shared import bus as busmod
from tests.conftest import unique


def frame(w, h, seed=0):
    return np.random.default_rng(seed).integers(0, 256, w * h * 3 // 2, dtype=np.uint8)


async def test_the_first_batch_of_a_stream_needs_no_reference_and_waits_for_none(bus):
    t0 = time.monotonic()
    handed = await ReferenceStore(bus, wait_s=5).for_batch(unique(), 0)
    assert handed.reference is None and handed.reason == "first"
    assert time.monotonic() - t0 < 0.5


async def test_another_worker_finds_the_previous_batch_reference_on_the_bus(bus):
    sid, f = unique(), frame(64, 48)
    await ReferenceStore(bus, wait_s=1).publish(sid, 3, 64, 48, f, "x264")
    handed = await ReferenceStore(bus, wait_s=1).for_batch(sid, 4)  # a worker that coded nothing yet
    assert handed.reason is None
    assert (handed.reference.batch, handed.reference.width, handed.reference.height) == (3, 64, 48)
    assert np.array_equal(handed.reference.frame, f)


async def test_a_4k_reference_travels_in_parts_under_a_stock_max_payload(bus, monkeypatch):
    monkeypatch.setattr(type(bus), "max_inline", property(lambda self: (1 << 20) - 16384))  # NATS's default 1 MB
    sid, f = unique(), frame(3840, 2160)
    await ReferenceStore(bus, wait_s=1).publish(sid, 0, 3840, 2160, f, "av1")
    parts = -(-f.nbytes // bus.max_inline)
    last = await bus.js.get_last_msg(busmod.REFS_STREAM, refs_subject(sid, parts - 1))
    assert parts > 1 and last.headers["Aic-Ref-Parts"] == str(parts) and len(last.data) < (1 << 20)
    handed = await ReferenceStore(bus, wait_s=1).for_batch(sid, 1)
    assert handed.reason is None and np.array_equal(handed.reference.frame, f)


async def test_a_batch_whose_predecessor_never_hands_on_a_reference_times_out_to_a_key_frame(bus):
    sid = unique()
    await ReferenceStore(bus, wait_s=1).publish(sid, 3, 64, 48, frame(64, 48), "x264")
    t0 = time.monotonic()
    handed = await ReferenceStore(bus, wait_s=0.4).for_batch(sid, 6)  # batch 5's is not there
    assert handed.reference is None and handed.reason == "timeout"
    assert 0.4 <= time.monotonic() - t0 < 2


async def test_a_waiting_batch_takes_the_reference_as_soon_as_it_is_published(bus):
    import asyncio

    sid, store = unique(), ReferenceStore(bus, wait_s=5)
    waiting = asyncio.create_task(ReferenceStore(bus, wait_s=5).for_batch(sid, 1))
    await asyncio.sleep(0.3)
    t0 = time.monotonic()
    await store.publish(sid, 0, 64, 48, frame(64, 48), "x264")
    handed = await waiting
    assert handed.reason is None and time.monotonic() - t0 < 1


async def test_no_reference_on_the_bus_expired_or_deleted_means_a_key_frame_and_says_so(bus):
    sid = unique()
    assert (await ReferenceStore(bus, wait_s=0.2).for_batch(sid, 5)).reason == "no_reference"
    await ReferenceStore(bus, wait_s=1).publish(sid, 4, 64, 48, frame(64, 48), "x264")
    await bus.js.purge_stream(busmod.REFS_STREAM, subject=refs_subject(sid, 0))  # what expiry does after 10 min
    assert (await ReferenceStore(bus, wait_s=0.2).for_batch(sid, 5)).reason == "no_reference"


async def test_a_batch_coded_by_a_codec_that_hands_on_nothing_makes_the_next_one_a_key_frame_at_once(bus):
    sid = unique()
    await ReferenceStore(bus, wait_s=1).publish(sid, 7, 64, 48, None, "hybrid")
    t0 = time.monotonic()
    handed = await ReferenceStore(bus, wait_s=5).for_batch(sid, 8)
    assert handed.reference is None and handed.reason == "codec_change"
    assert time.monotonic() - t0 < 1


async def test_a_reference_whose_parts_disagree_is_not_used(bus, monkeypatch):
    monkeypatch.setattr(type(bus), "max_inline", property(lambda self: (1 << 20) - 16384))
    sid, f = unique(), frame(1280, 720)
    await ReferenceStore(bus, wait_s=1).publish(sid, 2, 1280, 720, f, "x264")
    # Part 1 replaced by another batch's (a writer caught mid-update, or a forgery).
    await bus.js.publish(refs_subject(sid, 1), b"x" * 100, headers={"Aic-Ref-Digest": "0" * 24})
    assert (await ReferenceStore(bus, wait_s=0.2).for_batch(sid, 3)).reason in ("no_reference", "timeout")


@pytest.mark.parametrize("stream_count", [70])
async def test_a_worker_keeps_a_bounded_number_of_local_references(bus, stream_count):
    store = ReferenceStore(bus, wait_s=1)
    for i in range(stream_count):
        await store.publish(f"s{i}", 0, 16, 16, frame(16, 16, i), "x264")
    assert len(store._local) <= 64


async def test_after_a_redelivery_the_reference_is_handed_on_only_if_the_bus_kept_these_very_bytes(
        bus, bus_cfg, monkeypatch):
    # Claim-checked payloads too (a 4K batch's payload can pass max_payload): compared chunk by chunk.
    monkeypatch.setattr(type(bus), "max_inline", property(lambda self: 4096))
    from services.compressor.worker import Outcome
    from shared.schemas import BatchMetrics, CompressedBatch
    from tests.conftest import compressor

    sid = unique()
    worker = compressor(bus_cfg)
    worker.bus, worker.refs = bus, ReferenceStore(bus, wait_s=0.2)

    def outcome(payload: bytes) -> Outcome:
        cb = CompressedBatch(sid, 3, "x264", 64, 48, 8, 25, 1, 0, 0.0, 0.0, "w", payload)
        return Outcome(BatchMetrics(f"{sid}:3", sid, "ok", "w", 0.0), cb, frame(64, 48), chain=sid)

    first = outcome(b"A" * 20000)
    await bus.publish(busmod.compressed_subject(sid), first.compressed.pack(), first.compressed.msg_id, varies=True)
    again = await bus.publish(busmod.compressed_subject(sid), first.compressed.pack(), first.compressed.msg_id,
                              varies=True)
    assert again.duplicate
    await worker._hand_off(first, again, first.compressed.pack())  # the same coding: its frame serves
    assert (await ReferenceStore(bus, wait_s=0.2).for_batch(sid, 4)).reason is None

    other = outcome(b"B" * 20000)  # coded differently on the retry (another reference, say)
    ack = await bus.publish(busmod.compressed_subject(sid), other.compressed.pack(), other.compressed.msg_id,
                            varies=True)
    assert ack.duplicate
    await worker._hand_off(other, ack, other.compressed.pack())
    assert (await ReferenceStore(bus, wait_s=0.2).for_batch(sid, 4)).reason == "no_reference"


def _batch(seq: int):
    from dataclasses import replace

    from services.ingest import read_batches

    return replace(next(iter(read_batches("lavfi:testsrc2=size=64x48:rate=30", "s", 8, 8))), batch_seq=seq)


def test_a_key_frame_request_another_worker_already_answered_makes_no_second_key_frame():
    from services.compressor.controls import StreamControls
    from services.compressor.handoff import Handed
    from services.compressor.worker import choose_reference
    from shared.codecs.reference import Reference
    from shared.config import CompressorConfig

    cfg, controls = CompressorConfig(keyframe_every_s=0), StreamControls()
    controls.request_keyframe("s", b'{"from_batch": 2}')  # every worker got the receiver's request
    # Batch 2 went out as a key frame on another worker; batch 3's reference says its chain began there.
    ref = Reference(2, 64, 48, frame(64, 48), since=2)
    assert choose_reference(_batch(3), Handed(ref, None), cfg, controls) == (ref, None)
    assert not controls.take_keyframe_request("s", 4)  # served: nothing pending any more
    # A reference from before the request does not answer it.
    controls.request_keyframe("s", b'{"from_batch": 5}')
    old = Reference(5, 64, 48, frame(64, 48), since=0)
    assert choose_reference(_batch(6), Handed(old, None), cfg, controls) == (None, "requested")


def test_a_key_frame_for_another_reason_answers_a_pending_request():
    from services.compressor.controls import StreamControls
    from services.compressor.handoff import Handed
    from services.compressor.worker import choose_reference
    from shared.codecs.reference import Reference
    from shared.config import CompressorConfig

    cfg, controls = CompressorConfig(keyframe_every_s=0), StreamControls()
    controls.request_keyframe("s", b'{"from_batch": 2}')
    assert choose_reference(_batch(2), Handed(None, "timeout"), cfg, controls) == (None, "timeout")
    ref = Reference(2, 64, 48, frame(64, 48), since=2)
    assert choose_reference(_batch(3), Handed(ref, None), cfg, controls) == (ref, None)


async def test_the_bus_copy_of_a_reference_says_where_its_chain_began(bus):
    sid = unique()
    await ReferenceStore(bus, wait_s=1).publish(sid, 7, 64, 48, frame(64, 48), "x264", since=4)
    handed = await ReferenceStore(bus, wait_s=1).for_batch(sid, 8)
    assert handed.reference.since == 4
