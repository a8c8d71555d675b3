"""The claim check: messages larger than the server's max_payload travel as chunks on AIC_BLOBS."""

from __future__ import annotations

import os

import pytest

from services.ingest import ingest
from shared import bus as busmod
from shared.bus import Bus, ClaimError
from shared.codecs import decode_payload
from shared.schemas import unpack_compressed_batch
from tests.conftest import compressor, metrics_writer, running, unique, wait_rows


@pytest.fixture
def small_messages(monkeypatch):
    """Every message over 4 KiB goes by claim check (in this process)."""
    monkeypatch.setattr(Bus, "max_inline", property(lambda self: 4096))


async def last(bus: Bus, stream: str, subject: str):
    return await bus.js.get_last_msg(stream, subject)


async def test_two_claim_checked_messages_with_one_id_keep_their_own_chunks(bus, small_messages):
    """A frame batch and its compressed batch share the id "stream:seq"; their chunks must not be
    taken for duplicates of each other."""
    sid = unique("cc")
    frames, coded = os.urandom(20_000), os.urandom(9_000)
    await bus.publish(busmod.frames_subject(sid), frames, f"{sid}:0", kind="frames")
    await bus.publish(busmod.compressed_subject(sid), coded, f"{sid}:0", kind="compressed")
    assert await bus.payload(await last(bus, busmod.FRAMES_STREAM, busmod.frames_subject(sid))) == frames
    assert await bus.payload(await last(bus, busmod.COMPRESSED_STREAM, busmod.compressed_subject(sid))) == coded


async def test_a_batch_coded_twice_differently_keeps_one_consistent_claim(bus, small_messages):
    """Worker A publishes its payload's chunks and dies before the header; worker B codes the batch
    again, differently.  B's chunks must not dedupe onto A's (B's header would then claim A's bytes
    at B's size): the header JetStream keeps reads back as B's own payload."""
    sid = unique("cc")
    subject = busmod.compressed_subject(sid)
    a, b = os.urandom(9_000), os.urandom(12_000)
    publish = bus.js.publish

    async def dies_before_the_header(subj, payload=b"", **kw):
        if subj == subject:
            raise ConnectionError("worker A died")
        return await publish(subj, payload, **kw)

    bus.js.publish = dies_before_the_header
    try:
        with pytest.raises(ConnectionError):
            await bus.publish(subject, a, f"{sid}:0", kind="compressed", varies=True)
    finally:
        bus.js.publish = publish
    await bus.publish(subject, b, f"{sid}:0", kind="compressed", varies=True)
    assert await bus.payload(await last(bus, busmod.COMPRESSED_STREAM, subject)) == b


async def test_a_forged_claim_is_refused_and_releasing_it_deletes_nothing(bus, small_messages):
    sid = unique("cc")
    frames = os.urandom(20_000)
    await bus.publish(busmod.frames_subject(sid), frames, f"{sid}:0", kind="frames")
    real = await last(bus, busmod.FRAMES_STREAM, busmod.frames_subject(sid))
    claim = real.headers[busmod.CLAIM_HEADER]
    # Another stream's message that points at the first one's chunks.
    other = unique("cc")
    await bus.js.publish(busmod.frames_subject(other), b"",
                         headers={busmod.MSG_ID_HEADER: f"{other}:0", busmod.CLAIM_HEADER: claim})
    forged = await last(bus, busmod.FRAMES_STREAM, busmod.frames_subject(other))
    with pytest.raises(ClaimError, match="another message"):
        await bus.payload(forged)
    await bus.release(forged)
    assert await bus.payload(real) == frames  # still there


async def test_a_claim_over_the_size_limit_is_refused_unread(bus, small_messages):
    sid = unique("cc")
    await bus.publish(busmod.frames_subject(sid), os.urandom(20_000), f"{sid}:0", kind="frames")
    msg = await last(bus, busmod.FRAMES_STREAM, busmod.frames_subject(sid))
    with pytest.raises(ClaimError, match="over the 10000-byte limit"):
        await bus.payload(msg, max_size=10_000)


async def test_a_batch_whose_frames_and_payload_both_travel_by_claim_check_decodes(
    bus, bus_cfg, postgres, small_messages
):
    sid = unique("cc")
    async with running(compressor(bus_cfg, concurrency=1), metrics_writer(bus_cfg, postgres.url)):
        await ingest(bus, "lavfi:testsrc2=size=320x240:rate=30", sid, 8, 8, progress=False)
        rows = await wait_rows(postgres.url, [sid], 1)
    assert rows[0]["status"] == "ok", rows[0]["reason"]
    assert rows[0]["compressed_bytes"] > 4096  # the payload went by claim check too
    msg = await last(bus, busmod.COMPRESSED_STREAM, busmod.compressed_subject(sid))
    assert msg.headers.get(busmod.CLAIM_HEADER)
    cb = unpack_compressed_batch(await bus.payload(msg))
    header, frames = decode_payload(cb.payload)
    assert frames.shape[0] == 8 and (header.width, header.height) == (320, 240)


async def test_the_receiver_gives_up_on_a_missing_batch_and_refuses_a_lying_one(bus, tmp_path):
    """A batch that never comes (rejected upstream) must not hold every later batch in memory; a
    batch whose payload disagrees with its own description is an error, not a crash."""
    import numpy as np

    from services.receiver import decode as receiver
    from shared.codecs import NativeCodec
    from shared.pixfmt import frame_size
    from shared.schemas import CompressedBatch

    sid, w, h = unique("rx"), 64, 48
    payload = NativeCodec("x264").encode(np.full((2, frame_size(w, h)), 128, np.uint8), w, h, 30.0)
    n = receiver.REORDER_WINDOW + 4
    for seq in [0, *range(2, n)]:  # batch 1 never arrives
        cb = CompressedBatch(sid, seq, "x264", w, h, 2, 30, 1, 2 * seq, 1.0, 2.0, "w", payload)
        await bus.publish(busmod.compressed_subject(sid), cb.pack(), f"{sid}:{seq}")
    liar = CompressedBatch(sid, n, "x264", w * 2, h, 2, 30, 1, 2 * n, 1.0, 2.0, "w", payload)
    await bus.publish(busmod.compressed_subject(sid), liar.pack(), f"{sid}:{n}")
    stats = await receiver.decode_stream(bus, sid, tmp_path / "out.y4m", idle_timeout=2.0)
    assert stats.gaps == [1] and stats.errors == 1
    assert stats.held_max <= receiver.REORDER_WINDOW + 1
    assert stats.batches == n - 1 and stats.frames == 2 * (n - 1)


def test_every_stream_gets_the_configured_replicas():
    from shared.config import BusConfig

    class _NC:  # no connection needed to lay out the topology
        def jetstream(self, timeout):
            return None

    configs = Bus(_NC(), BusConfig(replicas=3))._stream_configs()
    assert len(configs) >= 7 and {sc.num_replicas for sc in configs} == {3}
    with pytest.raises(ValueError, match="replicas"):
        BusConfig(replicas=0)


async def test_the_receiver_starts_a_new_file_where_the_frame_size_changes(bus, tmp_path):
    import av
    import numpy as np

    from services.receiver import decode as receiver
    from shared.codecs import NativeCodec
    from shared.pixfmt import frame_size
    from shared.schemas import CompressedBatch

    sid = unique("size")
    sizes = [(64, 48), (64, 48), (96, 64), (64, 48)]
    for seq, (w, h) in enumerate(sizes):
        frames = np.full((2, frame_size(w, h)), 40 * seq, np.uint8)
        cb = CompressedBatch(sid, seq, "x264", w, h, 2, 30, 1, 2 * seq, 1.0, 2.0, "w",
                             NativeCodec("x264").encode(frames, w, h, 30.0))
        await bus.publish(busmod.compressed_subject(sid), cb.pack(), f"{sid}:{seq}")
    stats = await receiver.decode_stream(bus, sid, tmp_path / "out.y4m", idle_timeout=2.0)
    assert stats.errors == 0 and stats.frames == 8
    assert stats.files == [tmp_path / "out.y4m", tmp_path / "out.1.y4m", tmp_path / "out.2.y4m"]
    got = []
    for path in stats.files:
        with av.open(str(path)) as c:
            got.append([(f.width, f.height) for f in c.decode(video=0)])
    assert got == [[(64, 48)] * 4, [(96, 64)] * 2, [(64, 48)] * 2]


async def test_the_receiver_starts_at_the_lowest_batch_the_bus_still_holds(bus, tmp_path):
    """Earlier batches expired (or a gateway continued an old stream): no gap is reported for them,
    and batches stored a little out of order are still written in order."""
    import numpy as np

    from services.receiver import decode as receiver
    from shared.codecs import NativeCodec
    from shared.pixfmt import frame_size
    from shared.schemas import CompressedBatch

    sid, w, h = unique("late"), 64, 48
    payload = NativeCodec("x264").encode(np.full((2, frame_size(w, h)), 128, np.uint8), w, h, 30.0)
    for seq in [41, 40, 42, 44, 43]:  # as two workers finished them
        cb = CompressedBatch(sid, seq, "x264", w, h, 2, 30, 1, 2 * seq, 1.0, 2.0, "w", payload)
        await bus.publish(busmod.compressed_subject(sid), cb.pack(), f"{sid}:{seq}")
    stats = await receiver.decode_stream(bus, sid, tmp_path / "out.y4m", idle_timeout=2.0)
    assert stats.gaps == [] and stats.batches == 5 and stats.frames == 10


def test_missing_batches_are_printed_as_ranges():
    from services.ingest.gateway import ranges_text as _ranges

    assert _ranges([1, 2, 3, 7, 9, 10]) == "1-3, 7, 9-10"
