"""A gateway never loses a batch the bus went away under (issue 14, item 1): kill -9 of nats-server
mid-ingest, restart on the same store; every batch gets exactly one row; past the outage bound the
gateway names the batches that did not reach the bus; a live source drops, counts and reports what
it could not hold."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from services.ingest import ingest
from services.ingest.gateway import BusOutage
from tests.conftest import compressor, metrics_writer, record_fault, running, unique, wait_rows

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
SOURCE = "lavfi:testsrc2=size=96x64:rate=30"


def kill_9(server) -> None:
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()


async def test_nats_killed_mid_ingest_and_back_loses_and_duplicates_no_batch(bus, bus_cfg, nats_server, postgres):
    sid = unique("outage")
    async with running(compressor(bus_cfg, codec="x264-psnr"), metrics_writer(bus_cfg, postgres.url)):
        task = asyncio.create_task(ingest(bus, SOURCE, sid, 8, 128, progress=False, in_flight=2))
        await asyncio.sleep(0.3)  # some batches are out, some not
        kill_9(nats_server)
        fault_at = time.time()
        await asyncio.sleep(3.0)  # the gateway retries, the file waits
        nats_server.start()  # the same port and store, as a supervisor would
        stats = await asyncio.wait_for(task, 120)
        rows = await wait_rows(postgres.url, [sid], 16, timeout=120)
    fig = await record_fault("kill -9 of nats-server while a file is published (back after 3 s)", postgres.url, [sid],
                             stats.batches, fault_at)
    assert fig["missing"] == fig["duplicates"] == 0
    assert stats.batches == 16 and stats.dropped == 0
    assert sorted(r["batch_seq"] for r in rows) == list(range(16))  # each once
    assert all(r["status"] == "ok" for r in rows)


async def test_past_the_outage_bound_the_gateway_names_the_batches_that_did_not_reach_the_bus(
    bus, bus_cfg, nats_server, postgres
):
    sid = unique("gone")
    task = asyncio.create_task(ingest(bus, SOURCE, sid, 8, 96, realtime=True, progress=False, outage_s=1.5))
    await asyncio.sleep(0.8)  # a few batches reach the bus
    kill_9(nats_server)
    with pytest.raises(BusOutage) as lost:
        await asyncio.wait_for(task, 60)
    nats_server.start()
    missing = set(lost.value.batches)
    assert missing and f"batches {min(missing)}" in str(lost.value)
    async with running(compressor(bus_cfg, codec="x264-psnr"), metrics_writer(bus_cfg, postgres.url)):
        await asyncio.sleep(5)  # time for whatever the bus has to become rows
        rows = await wait_rows(postgres.url, [sid], 1, timeout=60)
    coded = {r["batch_seq"] for r in rows}
    # Every batch read either reached the bus (a row) or is named as lost: never both, never neither.
    assert not coded & missing and coded | missing == set(range(max(coded | missing) + 1))


async def test_a_live_source_drops_what_it_cannot_hold_counts_it_and_each_drop_gets_a_row(
    bus, bus_cfg, nats_server, postgres
):
    sid = unique("live")
    async with running(compressor(bus_cfg, codec="x264-psnr"), metrics_writer(bus_cfg, postgres.url)):
        task = asyncio.create_task(ingest(bus, SOURCE, sid, 8, 96, realtime=True, progress=False, in_flight=1,
                                          buffer_batches=1))
        await asyncio.sleep(0.6)
        kill_9(nats_server)
        fault_at = time.time()
        await asyncio.sleep(1.6)  # about 6 batches of capture while the bus is away
        nats_server.start()
        stats = await asyncio.wait_for(task, 120)
        rows = await wait_rows(postgres.url, [sid], 12, timeout=120)
    await record_fault("kill -9 of nats-server under a live source with a 1-batch buffer (back after 1.6 s)",
                       postgres.url, [sid], stats.batches, fault_at, dropped=stats.dropped)
    dropped = [r for r in rows if r["status"] == "rejected"]
    assert stats.batches == 12 and stats.dropped >= 1 and len(dropped) == stats.dropped
    assert all(r["reason"].startswith("dropped_at_gateway") for r in dropped)
    assert sorted(r["batch_seq"] for r in rows) == list(range(12))  # every batch once: coded or counted dropped
