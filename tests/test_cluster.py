"""The same code on a NATS cluster (issue 14, item 5): three JetStream nodes on this machine, every
stream, consumer and bucket replicated three times; kill -9 of the frames stream's leader mid-run,
then a rolling restart of all three nodes, and every batch still gets exactly one row."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from services.ingest import ingest
from shared import bus as busmod
from shared.bus import Bus
from shared.embedded import NatsCluster
from tests.conftest import compressor, metrics_writer, record_fault, running, unique, wait_rows

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
SOURCE = "lavfi:testsrc2=size=96x64:rate=30"


@pytest.fixture
def cluster(tmp_path):
    c = NatsCluster(tmp_path / "cluster", nodes=3).start()
    try:
        yield c
    finally:
        c.stop()


async def topology(cfg) -> None:
    """The admin creates it once the cluster has a meta leader (a fresh cluster elects one first)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            bus = await Bus.connect(cfg, name="topology")
            try:
                await bus.ensure_topology()
                return
            finally:
                await bus.close()
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1.0)


async def _until(cfg, streams: tuple[str, ...], ready, timeout: float = 90):
    """``ready(infos)`` of the streams' infos, polled until it is truthy (the cluster electing, catching up)."""
    deadline = time.monotonic() + timeout
    bus = await Bus.connect(cfg, name="probe")
    try:
        while time.monotonic() < deadline:
            try:
                found = ready([await bus.js.stream_info(s) for s in streams])
                if found:
                    return found
            except Exception:
                pass
            await asyncio.sleep(0.5)
        raise AssertionError(f"{streams}: not ready after {timeout} s")
    finally:
        await bus.close()


async def leader(cfg, stream: str) -> str:
    return await _until(cfg, (stream,), lambda infos: infos[0].cluster and infos[0].cluster.leader, timeout=30)


async def current(cfg, streams: tuple[str, ...], replicas: int = 3) -> None:
    """Wait until each stream has a leader and every replica is current again (after a restart)."""
    await _until(cfg, streams, lambda infos: all(
        i.cluster and i.cluster.leader and len(i.cluster.replicas or []) == replicas - 1
        and all(r.current for r in i.cluster.replicas) for i in infos))


async def test_a_leader_kill_and_a_rolling_restart_lose_and_double_no_batch(cluster, postgres):
    admin = cluster.client("admin", ack_wait_s=10.0, max_deliver=5)
    await topology(admin)
    info = await leader(admin, busmod.FRAMES_STREAM)
    assert info in {s.cluster.name for s in cluster.servers}
    sid = unique("cluster")
    gw = await Bus.connect(cluster.client("gateway"), name="gw")
    try:
        async with running(compressor(admin, codec="x264-psnr"), metrics_writer(admin, postgres.url)):
            # A live stream for about 20 s: 75 batches of 8 frames.
            task = asyncio.create_task(ingest(gw, SOURCE, sid, 8, 8 * 75, realtime=True, progress=False))
            await asyncio.sleep(4)
            victim = cluster.node(await leader(admin, busmod.FRAMES_STREAM))
            victim.proc.send_signal(signal.SIGKILL)  # the frames stream's leader, mid-run
            victim.proc.wait()
            fault_at = time.time()
            await asyncio.sleep(3)
            victim.start()
            await current(admin, (busmod.FRAMES_STREAM, busmod.METRICS_STREAM))
            for node in cluster.servers:  # a rolling restart: one node at a time, each back before the next
                node.stop()
                node.start()
                await current(admin, (busmod.FRAMES_STREAM, busmod.METRICS_STREAM))
            stats = await asyncio.wait_for(task, 240)
            rows = await wait_rows(postgres.url, [sid], stats.batches, timeout=180)
    finally:
        await gw.close()
    await record_fault("3-node cluster, R3: kill -9 of the frames stream's leader, then a rolling restart of all three",
                       postgres.url, [sid], stats.batches, fault_at)
    seqs = [r["batch_seq"] for r in rows]
    assert stats.batches == 75 and stats.dropped == 0
    assert sorted(seqs) == list(range(75)), f"missing {set(range(75)) - set(seqs)}, rows {len(seqs)}"
    assert {r["status"] for r in rows} == {"ok"}
