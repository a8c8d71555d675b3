"""The bus refuses whoever has no business there (issue 13; docs/security.md lists each attack).

Against a real embedded nats-server as ``aic up`` starts it: TLS with its own CA, one user per role.
Each role's credential tries every other role's operations; every refusal is a clear permission
error and leaves no trace (no message, no consumer progress, no KV entry, no stream change)."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from dataclasses import replace

import pytest

from conftest import unique
from shared import bus as busmod
from shared import roles
from shared.bus import Bus, BusUnavailable, PermissionDenied, StreamKV
from shared.control import KV_BUCKET, estimate_subject
from shared.embedded import NatsServer

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
async def admin(nats_server) -> Bus:
    bus = await Bus.connect(nats_server.client("admin"), name="test-admin")
    await bus.ensure_topology()
    yield bus
    await bus.close()


async def test_an_anonymous_or_wrong_password_client_is_refused_at_once(nats_server):
    for cfg in (replace(nats_server.client("gateway"), user=None, password=None),
                replace(nats_server.client("gateway"), password="guess")):
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(PermissionDenied, match="refused the credentials"):
            await Bus.connect(cfg, name="intruder", wait_s=10)
        assert asyncio.get_running_loop().time() - t0 < 5  # refused, not retried until the deadline


async def test_a_plaintext_client_is_refused_and_publishes_nothing(nats_server, admin):
    before = (await admin.js.stream_info(busmod.FRAMES_STREAM)).state.messages
    password = nats_server.password("admin")
    with socket.create_connection(("127.0.0.1", nats_server.port), timeout=5) as s:
        info = json.loads(s.recv(65536).decode().split(" ", 1)[1])
        assert info["tls_required"] is True and info["auth_required"] is True
        connect = json.dumps({"user": "admin", "pass": password, "verbose": False, "pedantic": False})
        try:
            s.sendall(f"CONNECT {connect}\r\nPUB aic.frames.plain 1\r\nx\r\nPING\r\n".encode())
            answer = s.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            answer = b""
    assert b"PONG" not in answer  # never served in clear (and the password went nowhere: no TLS, no session)
    await asyncio.sleep(0.3)
    assert (await admin.js.stream_info(busmod.FRAMES_STREAM)).state.messages == before


async def test_a_server_with_a_certificate_from_another_ca_is_refused(nats_server, tmp_path):
    impostor = NatsServer(tmp_path / "impostor").start()  # its own CA, as an attacker's server would have
    try:
        cfg = replace(nats_server.client("compressor"), nats_url=impostor.url)  # our CA, our password
        with pytest.raises(BusUnavailable, match="TLS .* failed"):
            await Bus.connect(cfg, name="misdirected", wait_s=5)
    finally:
        impostor.stop()
    # And a client that trusts another CA cannot talk to ours.
    other = replace(nats_server.client("compressor"), ca_file=str(impostor.ca_file))
    with pytest.raises(BusUnavailable, match="TLS .* failed"):
        await Bus.connect(other, name="wrong-ca", wait_s=5)


def test_the_server_certificate_names_this_machine_and_the_keys_are_private(nats_server):
    ctx = ssl.create_default_context(cafile=str(nats_server.ca_file))
    der = None
    with socket.create_connection(("127.0.0.1", nats_server.port), timeout=5) as raw:
        raw.recv(65536)  # INFO first, then the handshake (NATS's order)
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert()
    assert ("IP Address", "127.0.0.1") in der["subjectAltName"]
    for secret in [nats_server.root / "tls" / "ca.key", nats_server.root / "tls" / "server.key",
                   *(nats_server.credentials_dir / f"{r}.password" for r in roles.ROLES)]:
        assert secret.stat().st_mode & 0o077 == 0, secret
    conf = (nats_server.root / "nats-server.conf").read_text()
    assert not any(nats_server.password(r) in conf for r in roles.ROLES)  # passwords only in the environment


# ---------------------------------------------------------------- the role matrix


async def _state(admin: Bus) -> dict:
    """Everything an operation could leave behind, as the admin sees it."""
    out = {}
    for name in await admin.js.streams_info():
        c = name.config.name
        out[c] = (name.state.messages, name.state.last_seq)
        for ci in await admin.js.consumers_info(c):
            if ci.config.durable_name:
                out[f"{c}/{ci.name}"] = (ci.delivered.stream_seq, ci.ack_floor.stream_seq, ci.num_ack_pending)
    return out


async def _attempt(bus: Bus, op) -> str:
    """"ok", or "denied" when the server refused it (a clear permission error, not a timeout)."""
    async def run():
        await op(bus)
        await bus.nc.flush()
        await asyncio.sleep(0.15)  # a refused plain publish or subscription is answered by an error

    try:
        await asyncio.wait_for(bus.guarded(run()), 10)
    except PermissionDenied as exc:
        assert "permissions violation" in str(exc)
        return "denied"
    return "ok"


SID = "matrix"


async def _publish(subject: str, bus: Bus) -> None:
    await bus.js.publish(subject, b"forged", headers={busmod.MSG_ID_HEADER: unique("m")})


async def _fetch(stream: str, durable: str, bus: Bus) -> None:
    sub = await bus.js.pull_subscribe_bind(durable=durable, stream=stream)
    try:
        for msg in await sub.fetch(1, timeout=1):
            await msg.ack()
    except Exception as exc:  # nats-py's own timeout class: an empty consumer is not a refusal
        if "Timeout" not in type(exc).__name__:
            raise
    finally:
        await sub.unsubscribe()


async def _subscribe(subject: str, bus: Bus) -> None:
    await bus.nc.subscribe(subject)


async def _kv_put(bucket: str, bus: Bus) -> None:
    await StreamKV(bus, bucket).put("matrix", b"0")


async def _read_compressed(bus: Bus) -> None:
    sub = await bus.follow(busmod.COMPRESSED_STREAM, busmod.compressed_subject(SID))
    await sub.next_msg(timeout=5)
    await sub.close()


async def _get(stream: str, bus: Bus, direct: bool = True) -> None:
    try:
        await bus.js.get_msg(stream, 1, direct=direct)
    except busmod.NotFoundError:
        pass


async def _create_stream(bus: Bus) -> None:
    await bus.js.add_stream(name="ROGUE", subjects=["rogue.>"])


async def _delete_stream(bus: Bus) -> None:
    await bus.js.delete_stream(busmod.COMPRESSED_STREAM)


async def _purge(bus: Bus) -> None:
    await bus.js.purge_stream(busmod.FRAMES_STREAM)


#: operation -> (how, the roles that may).  Every attack of the issue that the bus must stop is here.
OPERATIONS = {
    "publish frames": (lambda b: _publish(busmod.frames_subject(SID), b), {"gateway", "edge"}),
    "publish a forged compressed payload": (lambda b: _publish(busmod.compressed_subject(SID), b), {"compressor"}),
    "publish a forged metrics record": (lambda b: _publish(busmod.metrics_subject("ATTACKER"), b), {"compressor"}),
    "publish a forged reference": (lambda b: _publish(f"{busmod.REFS_PREFIX}._.{SID}.0", b), {"compressor"}),
    "publish a dead letter": (lambda b: _publish(busmod.deadletter_subject(SID), b), {"compressor", "metrics"}),
    "fetch and ack frame batches": (lambda b: _fetch(busmod.FRAMES_STREAM, busmod.COMPRESSOR_CONSUMER, b),
                                    {"compressor"}),
    "fetch and ack metrics records": (lambda b: _fetch(busmod.METRICS_STREAM, busmod.METRICS_CONSUMER, b),
                                      {"metrics"}),
    "subscribe to raw frames": (lambda b: _subscribe("aic.frames.>", b), set()),
    "subscribe to a compressor's replies (fetched frames)": (lambda b: _subscribe("_INBOX.compressor.>", b),
                                                             {"compressor"}),
    "read frames by sequence": (lambda b: _get(busmod.FRAMES_STREAM, b, direct=False), {"compressor"}),
    "read claim-checked chunks": (lambda b: _get(busmod.BLOBS_STREAM, b), {"compressor"}),
    "read compressed payloads": (_read_compressed, {"receiver", "edge"}),
    "write a stream config": (lambda b: _kv_put(KV_BUCKET, b), {"operator", "metrics"}),
    "reset a stream's numbering": (lambda b: _kv_put(busmod.INGEST_BUCKET, b), {"gateway", "edge"}),
    "publish a bandwidth estimate": (lambda b: _publish(estimate_subject(SID), b), {"receiver", "edge"}),
    "create a stream": (_create_stream, set()),
    "purge the frames": (_purge, set()),
    "delete a stream": (_delete_stream, set()),
}


@pytest.mark.parametrize("role", [r for r in roles.ROLES if r != roles.ADMIN])
async def test_each_role_may_do_its_own_job_only_and_a_refusal_leaves_no_trace(role, nats_server, admin):
    # Something for every operation to act on: a frame batch, a metrics record, a compressed payload.
    for subject in (busmod.frames_subject(SID), busmod.metrics_subject("w"), busmod.compressed_subject(SID)):
        await _publish(subject, admin)
    bus = await Bus.connect(nats_server.client(role), name=f"test-{role}")
    try:
        for name, (op, allowed) in OPERATIONS.items():
            before = await _state(admin)
            kv_before = await _kv_keys(admin)
            outcome = await _attempt(bus, op)
            if role in allowed:
                assert outcome == "ok", f"{role} may {name}"
            else:
                assert outcome == "denied", f"{role} must not {name}"
                assert await _state(admin) == before, f"{role}'s refused '{name}' left a trace"
                assert await _kv_keys(admin) == kv_before, f"{role}'s refused '{name}' wrote a key"
    finally:
        await bus.close()


async def _kv_keys(admin: Bus) -> dict:
    return {bucket: await admin.kv_keys(bucket) for bucket in (KV_BUCKET, busmod.INGEST_BUCKET)}


async def test_the_admin_may_do_everything(nats_server, admin):
    for subject in (busmod.frames_subject(SID), busmod.metrics_subject("w"), busmod.compressed_subject(SID)):
        await _publish(subject, admin)
    for name, (op, _) in OPERATIONS.items():
        assert await _attempt(admin, op) == "ok", name


async def test_a_service_without_the_topology_says_who_must_create_it(bare_nats_server):
    bus = await Bus.connect(bare_nats_server.client("compressor"), name="early")
    try:
        with pytest.raises(busmod.TopologyMissing, match="aic up"):
            await asyncio.wait_for(bus.prepare((busmod.FRAMES_STREAM,)), 10)
    finally:
        await bus.close()
