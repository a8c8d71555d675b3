"""The metrics service's HTTP API: behaviour, errors as JSON, and no 500 for any input its OpenAPI spec admits."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time

import asyncpg
import httpx
import pytest

from services.metrics.migrations import refresh_rollups
from services.metrics.writer import RowStore, to_record
from shared.aio import run_blocking
from shared.embedded import free_port
from shared.schemas import BatchMetrics
from tests.conftest import unique

pytestmark = pytest.mark.slow


@pytest.fixture
def api(nats_server, postgres):
    """``aic metrics`` as a user runs it, with its API on a free port; yields the base URL."""
    port = free_port()
    env = {**os.environ, **nats_server.env("metrics"), "AIC_DATABASE_URL": postgres.url, "AIC_API_RATE": "1000"}
    proc = subprocess.Popen([sys.executable, "-m", "services.metrics", "--http-port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/readyz", proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def wait_ready(url: str, proc, **kw) -> httpx.Response:
    """GET ``url`` until it answers 200 (a minute at most, while ``proc`` lives); a TLS failure is final."""
    deadline = time.monotonic() + 60
    while True:
        try:
            r = httpx.get(url, timeout=2, **kw)
            if r.status_code == 200:
                return r
        except httpx.ConnectError as exc:
            if "CERTIFICATE" in str(exc):
                raise
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline and proc.poll() is None, "metrics service did not get ready"
        time.sleep(0.3)


@pytest.fixture
def admin_token(api, postgres) -> dict:
    """Headers with a token that reaches everything (made after the service migrated the database)."""
    return {"Authorization": f"Bearer {run_blocking(make_token(postgres.url, 'admin', '*'))}"}


async def make_token(url: str, role: str, tenant: str = "default", **kw) -> str:
    from services.metrics.auth import create_token
    from services.metrics.migrations import migrate

    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
        return (await create_token(conn, role, tenant, **kw))[1]
    finally:
        await conn.close()


async def seed(url: str, sid: str, n: int) -> None:
    store = RowStore(url)
    now = time.time()
    try:
        await store.write([to_record(BatchMetrics(
            f"{sid}:{i}", sid, "ok", "w1", now - 60 + i, batch_seq=i, captured_at=now - 61 + i, codec="hybrid",
            frames=8, width=320, height=240, compressed_bytes=1000 + i, kbps=100.0, psnr_y=38.0, latency_ms=50.0 + i, mode="adaptive",
            baseline_bytes=2000 if i % 5 == 0 else None)) for i in range(n)])
        await refresh_rollups(store.conn)
    finally:
        await store.close()


async def test_config_round_trips_through_the_kv_the_workers_watch(api, admin_token, bus):
    sid = unique("cfg")
    async with httpx.AsyncClient(base_url=api, headers=admin_token) as c:
        r = await c.post("/api/v1/aic/config", json={"stream_id": sid, "mode": "aggressive", "level_max": 3})
        assert r.status_code == 200, r.text
        assert r.json()["effective"] == {"mode": "aggressive", "target_psnr_y": 30.0, "level_min": 0, "level_max": 3,
                                         "budget_kbps": None}
        got = (await c.get("/api/v1/aic/config", params={"stream_id": sid})).json()
        assert got[0]["config"] == {"mode": "aggressive", "level_max": 3}
        bad = await c.post("/api/v1/aic/config", json={"stream_id": sid, "level_min": 5, "level_max": 2})
        assert bad.status_code == 400 and bad.json()["error"] == "invalid_config"
        assert (await c.post("/api/v1/aic/config", json={"stream_id": "a b"})).status_code == 422
        missing = await c.get("/api/v1/aic/config", params={"stream_id": unique("none")})
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    entry = await (await bus.config_kv()).get(sid)
    assert b"aggressive" in entry.value  # the same record `aic config get` and the workers read


async def test_patch_merges_put_replaces_and_both_answer_in_the_clis_shape(api, admin_token, bus):
    from shared.control import StreamConfig

    sid = unique("cfg")
    url = f"/api/v1/aic/config/{sid}"
    async with httpx.AsyncClient(base_url=api, headers=admin_token) as c:
        assert (await c.put(url, json={"mode": "aggressive", "target": 31, "level_max": 3})).status_code == 200
        merged = await c.patch(url, json={"budget_kbps": 800, "target": None})  # null unsets, the rest stays
        assert merged.json()["config"] == {"mode": "aggressive", "level_max": 3, "budget_kbps": 800.0}
        replaced = await c.put(url, json={"level_min": 1})  # what is not given takes the preset
        assert replaced.json()["config"] == {"mode": "adaptive", "level_min": 1}
        assert (await c.patch(url, json={"level_max": 0})).status_code == 400  # below level_min: refused, unchanged
        assert (await c.patch(url, json={"turbo": 1})).status_code == 422
        final = (await c.get("/api/v1/aic/config", params={"stream_id": sid})).json()[0]
    stored = StreamConfig.from_json((await (await bus.config_kv()).get(sid)).value)
    assert final == stored.describe(sid) == replaced.json()  # the one shape `aic config get` prints too
    assert StreamConfig(mode="aggressive", target=31).updated(["target=", "budget_kbps=800"]) == \
        StreamConfig(mode="aggressive").merged({"budget_kbps": 800})  # `aic config set` is PATCH


async def test_a_corrupt_stored_config_is_the_servers_fault_not_the_clients(api, admin_token, bus):
    sid = unique("bad")
    await (await bus.config_kv()).put(sid, b'{"mode": "turbo"}')  # written around the API's validation
    async with httpx.AsyncClient(base_url=api, headers=admin_token) as c:
        one = await c.get("/api/v1/aic/config", params={"stream_id": sid})
        assert one.status_code == 500 and one.json()["error"] == "stored_config_invalid"
        listed = await c.get("/api/v1/aic/config")
        assert listed.status_code == 200 and sid not in [x["stream_id"] for x in listed.json()]
        # A merge needs the stored config and says it is broken; a replace repairs it.
        assert (await c.patch(f"/api/v1/aic/config/{sid}", json={"level_max": 3})).status_code == 400
        assert (await c.put(f"/api/v1/aic/config/{sid}", json={"mode": "off"})).json()["config"] == {"mode": "off"}
        # A 'default.' prefix is no stream id any worker reads: refused, not stored.
        assert (await c.put("/api/v1/aic/config/default.cam", json={"mode": "off"})).status_code == 422


async def test_metrics_are_filtered_and_paginated_without_gaps_or_repeats(api, admin_token, postgres):
    sid = unique("page")
    await seed(postgres.url, sid, 25)
    seen, cursor = [], None
    async with httpx.AsyncClient(base_url=api, headers=admin_token) as c:
        while True:
            params = {"stream_id": sid, "limit": 10, **({"cursor": cursor} if cursor else {})}
            page = (await c.get("/api/v1/aic/metrics", params=params)).json()
            seen += [item["batch_seq"] for item in page["items"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert seen == list(range(24, -1, -1))  # newest first, each once
        assert (await c.get("/api/v1/aic/metrics", params={"stream_id": sid, "codec": "x264"})).json()["items"] == []
        assert (await c.get("/api/v1/aic/metrics", params={"cursor": "garbage"})).status_code == 422
        summary = (await c.get("/api/v1/aic/performance/summary", params={"stream_id": sid})).json()
        assert summary[0]["batches"] == 25 and summary[0]["codec"] == "hybrid"
        bw = (await c.get("/api/v1/aic/stats/bandwidth", params={"stream_id": sid})).json()
        assert bw[0]["sampled_batches"] == 5 and bw[0]["native_bytes"] == 10_000
        assert bw[0]["saved_fraction"] == pytest.approx(1 - sum(1000 + i for i in range(0, 25, 5)) / 10_000)
        assert "aic_metrics_rows_total" in (await c.get("/metrics")).text
        assert (await c.get("/healthz")).json() == {"status": "ok"}


def test_no_input_the_openapi_spec_admits_makes_a_server_error(api, admin_token):
    # Under authentication: an admin token reaches every operation, so the fuzzing gets past the 401s.
    r = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{api}/openapi.json", "--checks", "not_a_server_error",
         "-H", f"Authorization: {admin_token['Authorization']}",
         "--max-examples", "40", "--seed", "1", "--no-color", "--request-timeout", "10"],
        capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


def test_the_api_serves_https_with_a_certificate_from_the_stacks_ca(nats_server, postgres, tmp_path):
    """``aic up --https``: the API's certificate is signed by the CA that signs NATS's, so clients trust
    one CA for both; a client that trusts only the system's CAs, or speaks plain HTTP, gets nothing."""
    from shared.pki import ensure_server_tls

    tls = ensure_server_tls(nats_server.ca_file.parent, stem="api")
    trust = ssl.create_default_context(cafile=str(nats_server.ca_file))
    port = free_port()
    env = {**os.environ, **nats_server.env("metrics"), "AIC_DATABASE_URL": postgres.url}
    proc = subprocess.Popen([sys.executable, "-m", "services.metrics", "--http-port", str(port), "--tls-cert",
                             str(tls.cert_file), "--tls-key", str(tls.key_file)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"https://127.0.0.1:{port}"
    try:
        r = wait_ready(f"{url}/healthz", proc, verify=trust)
        assert r.status_code == 200 and tls.ca_file == nats_server.ca_file
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{url}/healthz", timeout=2)  # the system's CAs do not know aic's
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)  # no plain HTTP
    finally:
        proc.terminate()
        proc.wait(30)
