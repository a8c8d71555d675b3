"""Tenants (issue 13): a tenant's gateway, receiver and operator reach only that tenant's streams.

A stream of tenant T has the id ``T.NAME``; the default tenant's streams keep their plain ids, so a
single-tenant install runs unchanged.  Against a real embedded nats-server with two tenants."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from conftest import compressor, running, unique
from services.ingest import ingest
from services.receiver import decode_stream
from shared import bus as busmod
from shared.bus import Bus, PermissionDenied
from shared.control import KV_BUCKET, StreamConfig, estimate_subject
from shared.roles import stream_ids
from shared.schemas import DEFAULT_TENANT, STREAM_ID_RE, tenant_of
from tests.test_bus_security import _attempt, _kv_keys, _state

pytestmark = pytest.mark.timeout(300)
SOURCE = "lavfi:testsrc2=size=96x64:rate=30"


@pytest.mark.parametrize("sid, tenant", [("cam1", "default"), ("acme.cam1", "acme"), ("a-b_1.x", "a-b_1")])
def test_a_stream_id_names_its_tenant_and_the_default_tenant_needs_no_prefix(sid, tenant):
    assert STREAM_ID_RE.match(sid) and tenant_of(sid) == tenant


@pytest.mark.parametrize("sid", ["default.cam1", "a.b.c", "acme.", ".cam", "acme.cam 1", "a" * 33 + ".x", "a~c1"])
def test_ambiguous_or_malformed_stream_ids_are_refused(sid):
    assert not STREAM_ID_RE.match(sid)


@pytest.fixture
async def tenants(nats_server):
    for t in ("acme", "beta"):
        nats_server.add_tenant(t)
    admin = await Bus.connect(nats_server.client("admin"), name="tenants-admin")
    yield admin
    await admin.close()


async def _connect(nats_server, role, tenant=None) -> Bus:
    return await Bus.connect(nats_server.client(role, tenant), name=f"{role}-{tenant}")


async def _connect_all(nats_server, *who: tuple[str, str | None]) -> list[Bus]:
    return [await _connect(nats_server, role, tenant) for role, tenant in who]


async def test_a_tenant_reaches_nothing_of_another_tenant_or_of_the_default_tenant(nats_server, tenants):
    admin = tenants
    # What there is to reach: each tenant's frames, compressed payload, config and numbering.
    for sid in ("acme.cam", "beta.cam", "cam"):
        for subject in (busmod.frames_subject(sid), busmod.compressed_subject(sid)):
            await admin.js.publish(subject, b"x", headers={busmod.MSG_ID_HEADER: unique("m")})
        await (await admin.config_kv()).put(sid, StreamConfig(mode="off").to_json())
        await (await admin.ingest_kv()).put(sid, b"1")

    def publish(sid):
        return lambda b: b.js.publish(busmod.frames_subject(sid), b"forged", headers={busmod.MSG_ID_HEADER: unique("f")})

    def follow(sid):
        async def op(b):
            f = await b.follow(busmod.COMPRESSED_STREAM, busmod.compressed_subject(sid))
            await f.next_msg(timeout=5)
            await f.close()
        return op

    def kv(which, sid, write):
        async def op(b):
            bucket = await (b.config_kv() if which == "config" else b.ingest_kv())
            await (bucket.put(sid, b"{}") if write else bucket.get(sid))
        return op

    def estimate(sid):
        return lambda b: b.nc.publish(estimate_subject(sid), b'{"kbps": 1}')

    for me, mine, others in (("acme", "acme.cam", ("beta.cam", "cam")), ("beta", "beta.cam", ("acme.cam", "cam")),
                             (None, "cam", ("acme.cam", "beta.cam"))):
        gw, rx, op = await _connect_all(nats_server, *((r, me) for r in ("gateway", "receiver", "operator")))
        try:
            # Its own streams: everything its roles are for.
            for bus, attempt in ((gw, publish(mine)), (gw, kv("ingest", mine, True)), (rx, follow(mine)),
                                 (rx, estimate(mine)), (op, kv("config", mine, False)), (op, kv("config", mine, True))):
                assert await _attempt(bus, attempt) == "ok"
            assert await (await op.config_kv()).stream_ids(stream_ids(me or DEFAULT_TENANT)) == [mine]
            # Anyone else's: refused, without a trace.
            for sid in others:
                for bus, attempt in ((gw, publish(sid)), (gw, kv("ingest", sid, False)), (gw, kv("ingest", sid, True)),
                                     (rx, follow(sid)), (rx, estimate(sid)), (op, kv("config", sid, False)),
                                     (op, kv("config", sid, True))):
                    before, keys = await _state(admin), await _kv_keys(admin)
                    assert await _attempt(bus, attempt) == "denied", (me, sid)
                    assert await _state(admin) == before and await _kv_keys(admin) == keys
            # Listing: only its own keys, and a pattern beyond them is refused.
            with pytest.raises(PermissionDenied):
                await op.kv_keys(KV_BUCKET, ">")
        finally:
            for b in (gw, rx, op):
                await b.close()


@pytest.mark.slow
async def test_a_tenants_stream_goes_through_the_pipeline_and_only_its_receiver_decodes_it(
    nats_server, tenants, bus_cfg, tmp_path
):
    sid = f"acme.{unique('cam')}"
    gw, rx, other = await _connect_all(nats_server, ("gateway", "acme"), ("receiver", "acme"), ("receiver", "beta"))
    worker = compressor(nats_server.client("compressor", ack_wait_s=10.0, max_deliver=3), codec="x264-psnr")
    try:
        async with running(worker):
            stats = await ingest(gw, SOURCE, sid, 8, 32, progress=False)
            got = await decode_stream(rx, sid, tmp_path / "out.y4m", idle_timeout=3, expect_batches=4)
        assert stats.batches == 4 and got.batches == 4 and got.frames == 32 and not got.undecodable  # chained
        with pytest.raises(PermissionDenied):
            await decode_stream(other, sid, tmp_path / "stolen.y4m", idle_timeout=2)
    finally:
        for b in (gw, rx, other):
            await b.close()


def test_aic_tenant_add_gives_a_running_server_new_credentials_without_a_restart(nats_server, tmp_path):
    # The data folder an `aic up` would have: its NATS folder is this server's.
    data = nats_server.root.parent
    r = subprocess.run([sys.executable, "-m", "services.cli", "tenant", "add", "gamma", "--data-dir", str(data)],
                       capture_output=True, text=True, timeout=60, env={**os.environ})
    assert r.returncode == 0, r.stderr
    assert "operator@gamma" in r.stdout and (nats_server.credentials_dir / "gamma" / "operator.password").exists()

    async def use() -> list[str]:
        op = await _connect(nats_server, "operator", "gamma")
        try:
            await (await op.config_kv()).put("gamma.cam", StreamConfig().to_json())
            return await (await op.config_kv()).stream_ids("gamma.*")
        finally:
            await op.close()

    assert asyncio.run(use()) == ["gamma.cam"]


async def test_configs_and_numbering_written_before_tenants_stay_readable(nats_server):
    admin = await Bus.connect(nats_server.client("admin"), name="upgrade")
    try:
        legacy = admin._kv(KV_BUCKET)  # as an earlier aic kept it: under the bare stream id
        await legacy.put("old-cam", StreamConfig(mode="aggressive").to_json())
        await admin.ensure_topology()  # what `aic up` does at every start
        cfg = await admin.config_kv()
        assert StreamConfig.from_json((await cfg.get("old-cam")).value).mode == "aggressive"
        assert await cfg.stream_ids() == ["old-cam"]
    finally:
        await admin.close()
    op = await _connect(nats_server, "operator")  # and the default tenant's operator reaches it
    try:
        assert StreamConfig.from_json((await (await op.config_kv()).get("old-cam")).value).mode == "aggressive"
    finally:
        await op.close()


@pytest.mark.slow
async def test_another_tenants_gateway_can_neither_inject_into_a_stream_nor_make_the_bus_drop_its_batches(
    nats_server, tenants, postgres, tmp_path
):
    victim = f"acme.{unique('cam')}"
    gw, rx, attacker = await _connect_all(nats_server, ("gateway", "acme"), ("receiver", "acme"), ("gateway", "beta"))
    from services.ingest import read_batches
    from tests.conftest import metrics_writer, wait_rows

    try:
        forged = next(read_batches("lavfi:testsrc2=size=96x64:rate=30", victim, 8, 8))
        # 1. On its own subject, a batch that names the victim's stream (and takes batch 1's id first).
        await attacker.publish(busmod.frames_subject("beta.decoy"), forged.pack(), f"{victim}:1", kind="frames")
        # 2. Ids the victim's batches will carry, taken first on its own subject: dedup is stream-wide.
        for seq in (0, 2, 3):
            await attacker.publish(busmod.frames_subject("beta.decoy"), b"junk", f"{victim}:{seq}", kind="frames")
        worker = compressor(nats_server.client("compressor", ack_wait_s=10.0, max_deliver=3), codec="x264-psnr")
        writer = metrics_writer(nats_server.client("metrics"), postgres.url)
        async with running(worker, writer):
            stats = await ingest(gw, SOURCE, victim, 8, 32, progress=False)
            got = await decode_stream(rx, victim, tmp_path / "out.y4m", idle_timeout=3, expect_batches=4)
            decoy = await wait_rows(postgres.url, ["beta.decoy"], 4)
            rows = await wait_rows(postgres.url, [victim], 4)
        assert stats.batches == 4 and stats.duplicates == 4  # every id was taken, every batch went again
        assert got.batches == 4 and got.frames == 32 and not got.gaps  # all the victim's own, in order
        assert sorted(r["batch_seq"] for r in rows) == [0, 1, 2, 3] and all(r["status"] == "ok" for r in rows)
        assert all(r["status"] == "rejected" and r["stream_id"] == "beta.decoy" for r in decoy)
    finally:
        for b in (gw, rx, attacker):
            await b.close()
