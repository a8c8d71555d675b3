"""The fault runs of docs/reliability.md not covered elsewhere (issue 14): kill -9 of nats-server under a
backlog, a 60 s NATS outage, kill -9 of ``aic up`` and a restart on the same folder.  Each ends with
exactly one row per batch the gateway published."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from services.ingest import ingest
from shared import bus as busmod
from shared.bus import Bus
from tests.conftest import compressor, metrics_writer, record_fault, running, unique, wait_rows
from tests.test_outage import SOURCE, kill_9

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


async def test_nats_killed_under_a_backlog_keeps_every_batch(bus, bus_cfg, nats_server, postgres):
    sid = unique("backlog")
    stats = await ingest(bus, SOURCE, sid, 8, 8 * 40, progress=False)  # no worker yet: 40 batches wait
    admin = await Bus.connect(bus_cfg, name="probe")
    waiting = (await admin.js.consumer_info(busmod.FRAMES_STREAM, busmod.COMPRESSOR_CONSUMER)).num_pending
    await admin.close()
    async with running(compressor(bus_cfg, codec="x264-psnr"), metrics_writer(bus_cfg, postgres.url)):
        await wait_rows(postgres.url, [sid], 5)
        kill_9(nats_server)  # mid-drain
        fault_at = time.time()
        await asyncio.sleep(3)
        nats_server.start()
        rows = await wait_rows(postgres.url, [sid], 40, timeout=180)
        await asyncio.sleep(11)  # past one ack wait: a redelivery would have made its second row
        rows = await wait_rows(postgres.url, [sid], 40)
    fig = await record_fault("kill -9 of nats-server while workers drain a 40-batch backlog (back after 3 s)",
                             postgres.url, [sid], stats.batches, fault_at)
    assert waiting == 40 and fig["missing"] == fig["duplicates"] == 0
    assert sorted(r["batch_seq"] for r in rows) == list(range(40))


@pytest.mark.fault
async def test_a_60_s_nats_outage_pauses_a_file_and_loses_nothing(bus, bus_cfg, nats_server, postgres):
    sid = unique("sixty")
    async with running(compressor(bus_cfg, codec="x264-psnr"), metrics_writer(bus_cfg, postgres.url)):
        task = asyncio.create_task(ingest(bus, "lavfi:testsrc2=size=96x64:rate=30", sid, 8, 8 * 60, realtime=True,
                                          progress=False, in_flight=2, buffer_batches=400))
        await asyncio.sleep(4)
        kill_9(nats_server)
        fault_at = time.time()
        await asyncio.sleep(60)
        nats_server.start()
        stats = await asyncio.wait_for(task, 240)
        rows = await wait_rows(postgres.url, [sid], stats.batches, timeout=180)
    fig = await record_fault("60 s NATS outage under a live source (buffer of 400 batches: none dropped)",
                             postgres.url, [sid], stats.batches, fault_at, dropped=stats.dropped)
    assert stats.batches == 60 and stats.dropped == 0 and fig["missing"] == fig["duplicates"] == 0
    assert {r["status"] for r in rows} == {"ok"}


async def test_kill_9_of_aic_up_mid_ingest_and_a_restart_on_its_folder_lose_nothing(tmp_path):
    from tests.test_services import _start_up, no_named_servers

    env = no_named_servers()
    folder = tmp_path / "aic"
    sid = unique("upkill")
    first = _start_up(folder, env)
    ingest_env = {**env, "AIC_DATA_DIR": str(folder)}
    gateway = subprocess.Popen([sys.executable, "-m", "services.cli", "ingest", SOURCE, "--stream-id", sid, "--frames",
                                str(8 * 90), "--realtime", "--buffer-batches", "400"], env=ingest_env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    second = None
    try:
        await asyncio.sleep(6)
        first.send_signal(signal.SIGKILL)  # the supervisor, and with it NATS, PostgreSQL and the services
        first.wait()
        fault_at = time.time()
        await asyncio.sleep(3)
        second = _start_up(folder, env)  # the same folder: the same addresses, stores and credentials
        assert gateway.wait(240) == 0, gateway.stderr.read()
        from shared.endpoints import database_url

        url = database_url(None, folder)  # the restarted stack's, as any aic command finds it
        rows = await wait_rows(url, [sid], 90, timeout=180)
        fig = await record_fault("kill -9 of aic up under a live source, aic up again on its folder 3 s later", url,
                                 [sid], 90, fault_at)
    finally:
        for p in (first, second, gateway):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
    assert fig["missing"] == fig["duplicates"] == 0 and {r["status"] for r in rows} == {"ok"}
    assert os.path.exists(folder / "aic.lock")


async def test_kill_9_of_the_gateway_then_the_ingest_again_doubles_no_batch(bus, bus_cfg, nats_server, postgres):
    """A gateway killed mid-file: what it had published is coded once; the ingest run again continues
    the numbering after the numbers it had reserved (at most its in-flight window is a gap, which
    receivers skip), so nothing is numbered or counted twice."""
    sid = unique("gwkill")
    env = {**os.environ, **nats_server.env("gateway")}
    argv = [sys.executable, "-m", "services.cli", "ingest", SOURCE, "--stream-id", sid, "--frames", str(8 * 60),
            "--realtime"]
    async with running(compressor(bus_cfg, codec="x264-psnr"), metrics_writer(bus_cfg, postgres.url)):
        first = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await wait_rows(postgres.url, [sid], 10)
        first.send_signal(signal.SIGKILL)
        first.wait()
        fault_at = time.time()
        before = len(await wait_rows(postgres.url, [sid], 0))
        again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
        entry = await (await bus.ingest_kv()).get(sid)
        numbered = int(entry.value.split()[0])
        await asyncio.sleep(3)
        rows = await wait_rows(postgres.url, [sid], before + 60, timeout=120)
    seqs = sorted(r["batch_seq"] for r in rows)
    gap = numbered - len(seqs)
    fig = await record_fault(f"kill -9 of the gateway mid-file, then the ingest again ({gap} reserved numbers "
                             "never published: a gap)", postgres.url, [sid], len(set(seqs)), fault_at)
    assert len(seqs) == len(set(seqs)) and fig["duplicates"] == 0
    assert 0 <= gap <= 8 and seqs[-1] == numbered - 1  # the second run's 60 batches follow the first's numbers
    assert {r["status"] for r in rows} == {"ok"}
