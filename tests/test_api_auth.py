"""The HTTP API under authentication (issue 13): 401 without a working token, 403 beyond its role or
tenant (and nothing changes), 429 over its rate, and an audit row for every config change.

The app in this process, on a real PostgreSQL and a real NATS (as the metrics role)."""

from __future__ import annotations

from datetime import timedelta

import asyncpg
import httpx
import pytest

from services.metrics.api import create_app
from services.metrics.auth import create_token, revoke_token
from services.metrics.migrations import READER, WRITER, migrate, set_role_passwords
from shared.bus import Bus
from shared.control import StreamConfig
from tests.conftest import unique
from tests.test_api import seed

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def env(nats_server, postgres):
    """(client factory, tokens by name, the config KV, the pool)."""
    owner = await asyncpg.connect(postgres.url)
    await migrate(owner)
    await set_role_passwords(owner, {r: postgres.role_password(r) for r in (WRITER, READER)})
    await owner.close()
    # As aic up runs it: the API reads as aic_reader (row-level security by the token's tenant).
    pool = await asyncpg.create_pool(postgres.role_url(READER), min_size=1, max_size=2)
    async with asyncpg.create_pool(postgres.url, min_size=1, max_size=1) as owner_pool, owner_pool.acquire() as conn:
        tokens = {}
        for name, role, tenant, kw in (("admin", "admin", "*", {}), ("viewer", "viewer", "acme", {}),
                                       ("op", "operator", "acme", {}), ("beta-op", "operator", "beta", {}),
                                       ("default-op", "operator", "default", {}),
                                       ("expired", "admin", "*", {"expires_in": timedelta(seconds=-1)}),
                                       ("revoked", "admin", "*", {})):
            t, secret = await create_token(conn, role, tenant, name=f"test-{name}", **kw)
            tokens[name] = secret
        await revoke_token(conn, tokens["revoked"].split("_")[1])
    bus = await Bus.connect(nats_server.client("metrics"), name="api-auth")

    async def pool_getter():
        return pool

    async def kv_getter():
        return await bus.config_kv()

    app = create_app(pool_getter, kv_getter, rate=5.0)

    def client(token: str | None = None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api", headers=headers)

    yield client, tokens, await bus.config_kv(), pool
    await bus.close()
    await pool.close()


async def test_no_working_token_is_401_and_only_the_health_checks_are_open(env):
    client, tokens, _, _ = env
    for token in (None, "nonsense", "aic_000000000000_guess", tokens["admin"][:-2] + "xx", tokens["expired"],
                  tokens["revoked"]):
        async with client(token) as c:
            for path in ("/api/v1/aic/config", "/api/v1/aic/metrics", "/api/v1/aic/audit", "/metrics"):
                r = await c.get(path)
                assert r.status_code == 401 and r.json()["error"] == "unauthorized", (token, path)
                assert r.headers["www-authenticate"] == "Bearer"
            assert (await c.get("/healthz")).status_code == 200
    async with client(tokens["viewer"]) as c:
        assert (await c.get("/metrics")).status_code == 200


async def test_beyond_its_role_or_tenant_a_token_gets_403_and_changes_nothing(env):
    client, tokens, kv, pool = env
    await kv.put("beta.cam", StreamConfig(mode="conservative").to_json())
    await kv.put("acme.cam", StreamConfig(mode="adaptive").to_json())
    before = {sid: (await kv.get(sid)).value for sid in ("acme.cam", "beta.cam")}
    attempts = [
        ("viewer", "post", "/api/v1/aic/config", {"stream_id": "acme.cam", "mode": "off"}),  # a viewer writes
        ("op", "post", "/api/v1/aic/config", {"stream_id": "beta.cam", "mode": "off"}),  # another tenant's
        ("default-op", "post", "/api/v1/aic/config", {"stream_id": "acme.cam", "mode": "off"}),
        ("op", "get", "/api/v1/aic/config?stream_id=beta.cam", None),
        ("viewer", "get", "/api/v1/aic/metrics?stream_id=beta.cam", None),
        ("viewer", "get", "/api/v1/aic/performance/summary?stream_id=beta.cam", None),
        ("viewer", "get", "/api/v1/aic/stats/bandwidth?stream_id=beta.cam", None),
        ("op", "get", "/api/v1/aic/audit", None),  # admins only
    ]
    for who, method, path, body in attempts:
        async with client(tokens[who]) as c:
            r = await (c.post(path, json=body) if method == "post" else c.get(path))
            assert r.status_code == 403 and r.json()["error"] == "forbidden", (who, path, r.text)
    assert {sid: (await kv.get(sid)).value for sid in ("acme.cam", "beta.cam")} == before
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT set_config('aic.tenant', '*', true)")
        assert await conn.fetchval("SELECT count(*) FROM config_audit WHERE stream_id IN ('acme.cam', 'beta.cam')") == 0


async def test_listings_hold_only_the_tokens_tenant(env, postgres):
    client, tokens, kv, _ = env
    mine, theirs, default = f"acme.{unique('s')}", f"beta.{unique('s')}", unique("s")
    for sid in (mine, theirs, default):
        await seed(postgres.url, sid, 5)
        await kv.put(sid, StreamConfig().to_json())
    async with client(tokens["viewer"]) as c:
        items = (await c.get("/api/v1/aic/metrics", params={"limit": 1000})).json()["items"]
        assert {i["stream_id"] for i in items} == {mine}
        assert {x["stream_id"] for x in (await c.get("/api/v1/aic/config")).json()} <= {mine, "acme.cam"}
        assert mine in {x["stream_id"] for x in (await c.get("/api/v1/aic/config")).json()}
        assert {x["stream_id"] for x in (await c.get("/api/v1/aic/stats/bandwidth")).json()} == {mine}
        assert sum(x["batches"] for x in (await c.get("/api/v1/aic/performance/summary")).json()) == 5
    async with client(tokens["admin"]) as c:
        items = (await c.get("/api/v1/aic/metrics", params={"limit": 1000})).json()["items"]
        assert {mine, theirs, default} <= {i["stream_id"] for i in items}


async def test_over_its_rate_a_token_gets_429_with_retry_after_and_others_do_not(env):
    client, tokens, _, _ = env
    async with client(tokens["viewer"]) as c:
        codes = [(await c.get("/api/v1/aic/config")).status_code for _ in range(15)]  # burst 10 at 5/s
        assert 429 in codes and codes[0] == 200
        r = await c.get("/api/v1/aic/config")
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and r.json()["error"] == "rate_limited"
    async with client(tokens["op"]) as c:
        assert (await c.get("/api/v1/aic/config")).status_code == 200


async def test_every_config_change_is_audited_who_when_before_after_and_admins_read_it(env):
    client, tokens, _, _ = env
    sid = f"acme.{unique('cam')}"
    async with client(tokens["op"]) as c:
        assert (await c.post("/api/v1/aic/config", json={"stream_id": sid, "mode": "aggressive"})).status_code == 200
        assert (await c.post("/api/v1/aic/config", json={"stream_id": sid, "mode": "off"})).status_code == 200
    async with client(tokens["admin"]) as c:
        rows = (await c.get("/api/v1/aic/audit", params={"stream_id": sid})).json()
    assert [r["action"] for r in rows] == ["set", "set"]
    newest, first = rows
    assert first["before"] is None and first["after"] == {"mode": "aggressive"}
    assert newest["before"] == {"mode": "aggressive"} and newest["after"] == {"mode": "off"}
    assert {r["token_name"] for r in rows} == {"test-op"} and {r["role"] for r in rows} == {"operator"}
    assert newest["at"] >= first["at"]
