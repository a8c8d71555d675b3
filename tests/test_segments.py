"""A recorded file's backlog is coded in parallel segments: a batch that is not live starts a new
segment, with a real key frame, every ``segment_batches`` batches; such a batch needs no reference,
and batches that wait for one lend their codec slot, so a worker reaches the next segment."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from services.compressor.worker import WaitingRoom, _Slot, chain_of, planned_keyframe
from services.ingest import ingest, read_batches
from services.receiver import decode_stream
from shared.config import CompressorConfig
from shared.schemas import FrameBatch
from tests.conftest import compressor, metrics_writer, running, unique, wait_rows
from tests.test_chain_pipeline import SOURCE, assert_decoded_exactly, reasons
from tests.test_pipeline import read_video


def batch(seq: int, live: bool) -> FrameBatch:
    fb = next(iter(read_batches("lavfi:testsrc2=size=32x32:rate=30", "s", 8, 8)))
    return replace(fb, batch_seq=seq, live=live)


def test_a_batch_that_is_not_live_starts_a_segment_every_segment_batches_if_asked():
    cfg = CompressorConfig(segment_batches=4, keyframe_every_s=0)
    got = [planned_keyframe(batch(seq, live=False), cfg) for seq in range(10)]
    assert got == [None, None, None, None, "segment", None, None, None, "segment", None]


def test_live_batches_and_segment_batches_0_make_one_chain_but_for_periodic_key_frames():
    every_4 = 32 / 30  # 8 frames at 30 fps: one key frame every 4 batches
    live = [planned_keyframe(batch(seq, live=True), CompressorConfig(segment_batches=2, keyframe_every_s=every_4))
            for seq in range(9)]
    assert live == [None, None, None, None, "periodic", None, None, None, "periodic"]
    one_chain = CompressorConfig(segment_batches=0, keyframe_every_s=0)
    assert [planned_keyframe(batch(seq, live=False), one_chain) for seq in range(40)] == [None] * 40


def test_each_segment_of_a_file_is_its_own_chain_cut_at_segment_and_periodic_key_frames():
    every_6 = 48 / 30  # 8 frames at 30 fps: a periodic key frame every 6 batches
    cfg = CompressorConfig(segment_batches=4, keyframe_every_s=every_6)
    chains = [chain_of(batch(seq, live=False), cfg) for seq in range(13)]
    starts = [0, 0, 0, 0, 4, 4, 6, 6, 8, 8, 8, 8, 12]
    assert [key for key, _ in chains] == [f"s~c{n}" for n in starts]
    assert [seq for seq, (_, last) in enumerate(chains) if last] == [3, 5, 7, 11]
    # A live stream is one chain, whatever its key frames.
    assert {chain_of(batch(seq, live=True), cfg) for seq in range(13)} == {("s", False)}
    # A file with neither is one chain too.
    assert {chain_of(batch(seq, live=False), CompressorConfig(keyframe_every_s=0))[0] for seq in range(13)} == {"s~c0"}


async def test_a_waiting_batch_lends_its_slot_and_takes_one_back_before_it_codes():
    slots, room = asyncio.Semaphore(1), WaitingRoom(1)
    await slots.acquire()
    first = _Slot(slots)
    async with first.lent(room):
        assert not first.held and not slots.locked()  # another batch can be fetched meanwhile
        assert room.full  # ... unless the room is full: the fetch loop waits for room first
        has_room = asyncio.create_task(room.has_room())
        await asyncio.sleep(0.01)
        assert not has_room.done()
    await asyncio.wait_for(has_room, 1)
    assert first.held and slots.locked() and not room.full  # its slot back before it codes
    first.release()
    assert not slots.locked()


async def test_without_a_waiting_room_a_batch_waits_holding_its_slot():
    slots = asyncio.Semaphore(1)
    await slots.acquire()
    slot = _Slot(slots)
    async with slot.lent(WaitingRoom(0)):
        assert slot.held and slots.locked()


@pytest.mark.slow
async def test_one_worker_codes_the_segments_of_a_recorded_file_in_parallel_and_it_decodes_exactly(
    bus, bus_cfg, postgres, tmp_path
):
    sid = unique("seg")
    worker = compressor(bus_cfg, codec="x264-psnr", concurrency=2, keyframe_every_s=0, segment_batches=4)
    async with running(worker, metrics_writer(bus_cfg, postgres.url)):
        stats = await ingest(bus, SOURCE, sid, 8, 128, progress=False)  # a file at full speed: not live
        rows = await wait_rows(postgres.url, [sid], 16)
        out = tmp_path / "out.y4m"
        got = await decode_stream(bus, sid, out, idle_timeout=2, expect_batches=16)
    assert stats.batches == 16 and all(r["status"] == "ok" for r in rows)
    kf = reasons(rows)
    assert kf == ["first", None, None, None] + ["segment", None, None, None] * 3, kf
    done = {r["batch_seq"]: r["completed_at"] for r in rows}
    # In parallel: a segment's first batch, which needs no reference, was coded while the batches
    # before it still waited for theirs in turn (one chain would finish strictly in order).
    assert any(done[s] < done[s - 1] for s in (4, 8, 12)), done
    assert got.undecodable == [] and got.frames == 128
    source = np.concatenate([b.frames for b in read_batches(SOURCE, "ref", 8, 128)])
    assert_decoded_exactly(rows, np.stack(read_video(out)), source, 320, 240)


async def test_each_segment_of_a_stream_keeps_its_own_latest_reference_until_it_ends(bus):
    from services.compressor.handoff import ReferenceStore, chain_key, refs_subject
    from shared import bus as busmod
    from tests.test_handoff import frame

    sid = unique()
    first, second = chain_key(sid, 4), chain_key(sid, 8)
    writer = ReferenceStore(bus, wait_s=1)
    # Segment 2 runs ahead of segment 1 (coded in parallel): neither hides the other's reference.
    await writer.publish(second, 9, 64, 48, frame(64, 48, 2), "x264")
    await writer.publish(first, 5, 64, 48, frame(64, 48, 1), "x264")
    reader = ReferenceStore(bus, wait_s=1)  # another worker: the bus copies
    one, two = await reader.for_batch(first, 6), await reader.for_batch(second, 10)
    assert one.reference.batch == 5 and np.array_equal(one.reference.frame, frame(64, 48, 1))
    assert two.reference.batch == 9 and np.array_equal(two.reference.frame, frame(64, 48, 2))
    await writer.end_chain(first)  # its last batch delivered: nobody will predict from it
    with pytest.raises(Exception):
        await bus.js.get_last_msg(busmod.REFS_STREAM, refs_subject(first, 0))
    assert (await reader.for_batch(second, 10)).reference is not None
