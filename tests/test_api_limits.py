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


async def test_readyz_answers_within_a_second_naming_the_server_that_does_not():
    import asyncio
    import time

    async def hangs():
        await asyncio.sleep(30)  # a server that accepted the connection and never answers

    from contextlib import asynccontextmanager
    from types import SimpleNamespace

    @asynccontextmanager
    async def nothing():
        yield

    async def answer(*_):
        return []

    conn = SimpleNamespace(transaction=lambda **_: nothing(), execute=answer, fetch=answer)
    answering = SimpleNamespace(acquire=lambda: nothing_with(conn))

    @asynccontextmanager
    async def nothing_with(value):
        yield value

    async def ok():  # a database (or bus) that answers
        return answering

    for db, kv, down in ((hangs, ok, {"database"}), (ok, hangs, {"nats"}), (hangs, _unavailable, {"database", "nats"})):
        app = create_app(db, kv)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as c:
            t0 = time.monotonic()
            r = await c.get("/readyz")
            assert time.monotonic() - t0 < 1.0
            assert r.status_code == 503 and set(r.json()["detail"]) == down, r.text
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(ok, ok)), base_url="http://api") as c:
        assert (await c.get("/readyz")).json() == {"status": "ready"}


async def test_the_docs_page_is_whole_without_the_internet(client):
    async with client:
        r = await client.get("/docs")
    page = r.text
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/api/v1/aic/config/{stream_id}" in page and "PATCH" in page and "ConfigFields" in page
    # Nothing it shows is fetched from elsewhere: no script, stylesheet or image by URL.
    import re

    assert not re.search(r"<script|<link|src=|https?://", page)
