"""Bounded storage, backpressure and no deadlock (issue 14, item 3): aic's streams keep the limits its
configuration sets; a full frames stream makes gateways wait, not fail, and drains with nothing lost;
a batch about to expire unprocessed gets a row; a disk another process fills lowers the frames bound
before nats-server's writes fail, and a store write that failed anyway heals once the space is back."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
from nats.js import api as jsapi

from services.ingest import gateway, ingest
from shared import bus as busmod
from shared.bus import Bus
from shared.config import StoreLimits, parse_bytes
from shared.embedded import NatsServer
from tests.conftest import compressor, create_topology, metrics_writer, record_fault, running, unique, wait_rows

SOURCE = "lavfi:testsrc2=size=320x240:rate=30"  # 8 frames: 0.9 MiB, claim-checked under a 256 KiB max_payload
MiB = 1 << 20


def test_sizes_and_limits_read_as_an_operator_writes_them():
    assert parse_bytes("4G") == 4 << 30 and parse_bytes("512MiB") == 512 << 20 and parse_bytes("1024") == 1024
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("lots")
    lim = StoreLimits(frames_bytes=8 << 30, outputs_bytes=2 << 30)
    small = lim.fitted(5 << 30)
    assert small.store_bytes <= 5 << 30 and small.frames_bytes / small.outputs_bytes == pytest.approx(4, rel=0.01)
    assert lim.fitted(100 << 30) is lim
    assert StoreLimits(max_age_s=40, expire_margin_s=600).expires_after_s == 30  # a quarter of a short age at most
    with pytest.raises(ValueError):
        StoreLimits(frames_bytes=10)


@pytest.fixture
def small_store(tmp_path):
    """A server as aic up runs it, with small stream limits and a small max_payload (claim checks)."""
    limits = StoreLimits(frames_bytes=3 * MiB, outputs_bytes=32 * MiB)
    server = NatsServer(tmp_path / "nats", max_payload="256KB", store=limits).start()
    try:
        asyncio.run(create_topology(server))
        yield server
    finally:
        server.stop()


async def test_the_limits_are_applied_and_restored_at_every_topology_update(small_store):
    bus = await Bus.connect(small_store.client("admin"), name="t")
    try:
        frames = await bus.js.stream_info(busmod.FRAMES_STREAM)
        assert frames.config.max_bytes == 3 * MiB and frames.config.discard == jsapi.DiscardPolicy.NEW
        total = 0
        for name in busmod.OUTPUT_SHARES:
            info = await bus.js.stream_info(name)
            assert info.config.discard == jsapi.DiscardPolicy.OLD and 0 < info.config.max_bytes  # never refuse
            total += info.config.max_bytes
        assert total <= 32 * MiB
        # Someone unbounds the frames stream by hand; the next start (aic up, aic bus init) bounds it again.
        await bus.js.update_stream(replace(frames.config, max_bytes=-1))
        await bus.ensure_topology()
        assert (await bus.js.stream_info(busmod.FRAMES_STREAM)).config.max_bytes == 3 * MiB
    finally:
        await bus.close()


def _full_count(sid: str) -> float:
    return gateway.FULL.labels(sid)._value.get()


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_full_frames_stream_holds_the_gateway_back_and_drains_with_nothing_lost(small_store, postgres):
    sid = unique("full")
    cfg = small_store.client("admin", ack_wait_s=10.0, max_deliver=3)
    bus = await Bus.connect(small_store.client("gateway"), name="gw")
    try:
        # No worker yet: the stream fills to its bound, and the gateway waits (backpressure) instead of failing.
        task = asyncio.create_task(ingest(bus, SOURCE, sid, 8, 8 * 12, progress=False, in_flight=2, outage_s=60))
        deadline = time.monotonic() + 60
        while _full_count(sid) == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert _full_count(sid) > 0 and not task.done()
        admin = await Bus.connect(cfg, name="t")
        held = (await admin.js.stream_info(busmod.FRAMES_STREAM)).state.bytes
        await admin.close()
        assert held <= 3 * MiB
        fault_at = time.time()
        async with running(compressor(cfg, codec="x264-psnr"), metrics_writer(cfg, postgres.url)):
            stats = await asyncio.wait_for(task, 120)
            rows = await wait_rows(postgres.url, [sid], 12, timeout=120)
    finally:
        await bus.close()
    await record_fault("frames stream full (3 MiB bound, no worker), then workers start", postgres.url, [sid],
                       stats.batches, fault_at)
    assert stats.batches == 12 and stats.dropped == 0
    assert sorted(r["batch_seq"] for r in rows) == list(range(12)) and {r["status"] for r in rows} == {"ok"}


async def test_a_batch_about_to_expire_unprocessed_gets_an_expired_row(tmp_path, postgres):
    sid = unique("old")
    limits = StoreLimits(max_age_s=20, expire_margin_s=600)  # rows for batches 15 s old
    server = NatsServer(tmp_path / "nats", max_payload="256KB", store=limits).start()
    try:
        await create_topology(server)
        cfg = server.client("admin")
        bus = await Bus.connect(server.client("gateway"), name="gw")
        stats = await ingest(bus, SOURCE, sid, 8, 8 * 3, progress=False)
        await bus.close()
        worker = compressor(cfg)
        worker.bus = await Bus.connect(cfg, name="w")
        try:
            assert await worker.expire_old() == 0  # young batches are left to be coded
            await asyncio.sleep(15.5)
            assert await worker.expire_old() == 3
            left = (await worker.bus.js.stream_info(busmod.FRAMES_STREAM)).state
        finally:
            await worker.bus.close()
        async with running(metrics_writer(cfg, postgres.url)):
            rows = await wait_rows(postgres.url, [sid], 3, timeout=60)
    finally:
        server.stop()
    assert stats.batches == 3 and sorted(r["batch_seq"] for r in rows) == [0, 1, 2]
    assert all(r["status"] == "failed" and r["reason"].startswith("expired: waited ") for r in rows)
    assert left.consumer_count == 1 and left.messages <= 3 * 4  # the batches are gone (their chunks expire)


@pytest.fixture
def small_disk(tmp_path):
    """A 96 MiB file system of its own (tmpfs: root only), for filling the disk under a store."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        pytest.skip("needs root to mount a small file system (tmpfs)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` until ``leave`` bytes are free, as another process would."""
    junk = disk / "junk"
    with open(junk, "ab") as f:
        while True:
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            if free <= leave:
                break
            try:
                f.write(b"\0" * min(MiB, free - leave))
                f.flush()
            except OSError:
                break
    return junk


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.timeout(400)
async def test_a_disk_filled_by_someone_else_slows_the_gateways_and_a_failed_write_heals(small_disk, postgres):
    from services.storage import StoreGuard

    limits = StoreLimits(frames_bytes=40 * MiB, outputs_bytes=16 * MiB)
    server = NatsServer(small_disk / "nats", max_payload="256KB", store=limits).start()
    guard = StoreGuard(server, limits, server.client("admin"), every_s=0.3)
    watching = True

    async def watch():
        while watching:
            await asyncio.get_running_loop().run_in_executor(None, guard.check)
            await asyncio.sleep(0.3)

    try:
        await create_topology(server)
        cfg = server.client("admin", ack_wait_s=10.0, max_deliver=3)
        watcher = asyncio.create_task(watch())
        # 1. The disk fills while a backlog builds (no worker): the frames bound follows the disk down,
        # the gateway meets a full stream and waits, and nats-server never fails a write.
        junk = fill(small_disk, 12 * MiB)
        sid = unique("disk")
        gw = await Bus.connect(server.client("gateway"), name="gw")
        task = asyncio.create_task(ingest(gw, SOURCE, sid, 8, 8 * 24, progress=False, in_flight=2, outage_s=120))
        deadline = time.monotonic() + 60
        while _full_count(sid) == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert _full_count(sid) > 0 and guard.frames_bound < limits.frames_bytes and not task.done()
        assert not guard.write_failed
        junk.unlink()  # space comes back: the bound goes up, the workers drain the backlog
        async with running(compressor(cfg, codec="x264-psnr"), metrics_writer(cfg, postgres.url)):
            stats = await asyncio.wait_for(task, 180)
            rows = await wait_rows(postgres.url, [sid], 24, timeout=120)
            assert sorted(r["batch_seq"] for r in rows) == list(range(24)) and stats.batches == 24
            # 2. The disk fills to the last byte under a running pipeline: a store write fails; once
            # the space is back the guard restarts nats-server, and every batch still gets one row.
            sid2 = unique("enospc")
            task = asyncio.create_task(ingest(gw, SOURCE, sid2, 8, 8 * 24, progress=False, in_flight=2,
                                              outage_s=200, realtime=False))
            await asyncio.sleep(1.0)
            junk = fill(small_disk, 0)
            enospc_at = time.time()
            deadline = time.monotonic() + 60
            while not guard.write_failed and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            write_failed = guard.write_failed
            junk.unlink()
            stats2 = await asyncio.wait_for(task, 240)
            rows2 = await wait_rows(postgres.url, [sid2], 24, timeout=180)
        await gw.close()
    finally:
        watching = False
        server.stop()
    await record_fault("disk filled by another process during a backlog (frames bound follows it down)", postgres.url,
                       [sid], stats.batches)
    await record_fault("disk filled to the last byte under a running pipeline (failed write, server restarted)",
                       postgres.url, [sid2], stats2.batches, enospc_at)
    assert stats2.batches == 24 and sorted(r["batch_seq"] for r in rows2) == list(range(24))
    assert {r["status"] for r in rows + rows2} == {"ok"}
    assert write_failed and guard.restarts >= 1  # the write did fail, and the server was healed


async def test_metrics_records_the_stream_dropped_before_they_were_read_are_counted_not_silent(tmp_path, postgres):
    """The one bounded loss left: a metrics service away so long that its stream's bound drops records it
    has not read.  They are counted (aic_metrics_records_lost_total) and logged, and rows + lost = records."""
    from shared.schemas import BatchMetrics

    limits = StoreLimits(outputs_bytes=1 * MiB)  # the metrics stream: 256 KiB
    server = NatsServer(tmp_path / "nats", store=limits).start()
    sid = unique("lost")
    try:
        await create_topology(server)
        cfg = server.client("admin")
        bus = await Bus.connect(cfg, name="w")
        pad = {"note": "x" * 900}  # ~1 KiB a record
        for i in range(600):  # no metrics service meanwhile
            row = BatchMetrics(f"{sid}:{i}", sid, "ok", "w1", time.time(), batch_seq=i, captured_at=time.time(),
                               codec="x264", frames=8, extra=pad)
            await bus.publish(busmod.metrics_subject("w1"), row.pack(), f"m:{sid}:{i}")
        await bus.close()
        writer = metrics_writer(cfg, postgres.url)
        async with running(writer):
            deadline = time.monotonic() + 60
            while True:
                rows = await wait_rows(postgres.url, [sid], 1)
                if len(rows) + writer.lost >= 600 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
    finally:
        server.stop()
    assert writer.lost > 0 and len(rows) + writer.lost == 600
    assert sorted(r["batch_seq"] for r in rows) == list(range(600 - len(rows), 600))  # the oldest went
