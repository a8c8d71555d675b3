"""The HTTP API reads no request body over its limit: 413, declared or chunked, and nothing else breaks."""

from __future__ import annotations

import httpx
import pytest

from services.metrics.api import MAX_BODY_BYTES, Unavailable, create_app


async def _unavailable():
    raise Unavailable("no servers in this test")


@pytest.fixture
def client():
    app = create_app(_unavailable, _unavailable)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")


async def test_a_body_over_the_limit_is_refused_with_413_before_it_is_read(client):
    big = b'{"stream_id": "s", "pad": "' + b"x" * (4 * MAX_BODY_BYTES) + b'"}'
    async with client:
        r = await client.post("/api/v1/aic/config", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"] == "payload_too_large"

        async def chunks():  # no Content-Length: counted as it arrives
            for _ in range(8):
                yield b"x" * (MAX_BODY_BYTES // 2)

        r = await client.post("/api/v1/aic/config", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        r = await client.post("/api/v1/aic/config", content=b"1", headers={"content-length": "99999999999"})
        assert r.status_code == 413


async def test_a_body_under_the_limit_reaches_the_handler(client):
    async with client:
        r = await client.post("/api/v1/aic/config", json={"stream_id": "s", "mode": "off"},
                              headers={"Authorization": "Bearer aic_0_x"})
        assert r.status_code == 503 and r.json()["error"] == "unavailable"  # read and checked: no database here
        assert (await client.get("/healthz")).status_code == 200
