"""The HTTP API of the metrics service (FastAPI; the OpenAPI document is served at /openapi.json).

Reads come from PostgreSQL (rollups where they suffice), per-stream config
from the same NATS KV bucket that ``aic config`` and the workers use.  Every
call under ``/api/v1/aic`` needs a bearer token (services/metrics/auth.py) and
reaches only its tenant's streams.  Every error is JSON ``{"error": ...,
"detail": ...}`` with its status: 400 for a config that does not validate, 401
without a working token, 403 beyond the token's role or tenant, 404 for an
unknown stream config, 413 for a request body over 64 KiB, 422 for malformed
parameters, 429 over the token's request rate (with Retry-After), 503 when
the database or NATS is unreachable.
"""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import datetime, timedelta, timezone
from typing import Literal

import asyncpg
from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, field_validator

from services.metrics import auth
from services.metrics.auth import Token
from services.metrics.queries import performance_summary
from shared.control import ConfigError, StreamConfig
from shared.logs import get_logger
from shared.schemas import MODES, STREAM_ID_PATTERN, STREAM_ID_RE, STREAM_ID_RULE

log = get_logger("metrics-api")

API = "/api/v1/aic"
MAX_PAGE = 1000
STREAM_ID = STREAM_ID_PATTERN


class Unavailable(Exception):
    """A backing server (PostgreSQL, NATS) is unreachable."""


class ConfigFields(BaseModel):
    """A stream's config keys (shared/control.py ``StreamConfig``); PUT: the whole config, PATCH: the keys
    to change (null unsets one)."""

    model_config = {"extra": "forbid"}
    mode: Literal[MODES] | None = None  # type: ignore[valid-type]
    target: float | None = Field(None, ge=10, le=100, description="PSNR-Y dB for the learned path")
    level_min: int | None = Field(None, ge=0, le=7)
    level_max: int | None = Field(None, ge=0, le=7)
    budget_kbps: float | None = Field(None, ge=1, le=1e6)


class ConfigBody(ConfigFields):
    stream_id: str = Field(pattern=STREAM_ID, description="NAME, or TENANT.NAME for a tenant's stream")

    @field_validator("stream_id")
    @classmethod
    def _not_default_prefixed(cls, v: str) -> str:
        if not STREAM_ID_RE.match(v):
            raise ValueError(f"stream_id must be {STREAM_ID_RULE} (the default tenant's streams have no prefix)")
        return v


class ConfigOut(BaseModel):
    stream_id: str
    config: dict
    effective: dict


class MetricsPage(BaseModel):
    items: list[dict]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page; null on the last")


EARLIEST, LATEST = datetime(1970, 1, 1, tzinfo=timezone.utc), datetime(2200, 1, 1, tzinfo=timezone.utc)


class BadRequest(Exception):
    """A parameter that parses but makes no sense (422)."""


class Refused(Exception):
    """A request without a working token (401), beyond its token (403), or over its rate (429)."""

    def __init__(self, status: int, error: str, detail: str, retry_after: float | None = None):
        super().__init__(detail)
        self.status, self.error, self.detail, self.retry_after = status, error, detail, retry_after


_REFUSALS = {401: {"description": "no token, or one that is unknown, expired or revoked"},
             403: {"description": "beyond the token's role or tenant"},
             429: {"description": "over the token's request rate (Retry-After says when to try again)"}}


def _utc(t: datetime | None, default: datetime) -> datetime:
    """A query time as an aware UTC datetime (naive means UTC), within 1970..2200."""
    if t is None:
        return default
    try:
        t = t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)
    except (OverflowError, ValueError):
        raise BadRequest("time out of range") from None
    if not EARLIEST <= t <= LATEST:
        raise BadRequest("times must lie between 1970 and 2200")
    return t


def _read_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        t, batch_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        if not isinstance(t, str) or not isinstance(batch_id, str) or "\x00" in batch_id:
            raise ValueError
        return _utc(datetime.fromisoformat(t), EARLIEST), batch_id
    except (ValueError, TypeError, BadRequest):
        raise BadRequest("cursor is not one this API gave") from None


def _json_row(r: asyncpg.Record) -> dict:
    out = {}
    for k, v in r.items():
        out[k] = v.isoformat() if isinstance(v, datetime) else (json.loads(v) if k == "extra" and isinstance(v, str) else v)
    return out


#: How long /readyz waits for each backing server.
PROBE_S = 0.5


async def _probe(aw) -> str | None:
    """None if ``aw`` completes within PROBE_S, else what went wrong."""
    try:
        await asyncio.wait_for(aw, PROBE_S)
        return None
    except asyncio.TimeoutError:
        return f"no answer within {PROBE_S:g} s"
    except Exception as exc:  # Unavailable, or whatever the server's client raised
        return str(exc) or type(exc).__name__


def _json_text(value: bytes | str | None) -> str | None:
    """A stored config as JSON text for the audit (one that is not JSON is kept as a JSON string)."""
    if value is None:
        return None
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    try:
        json.loads(text)
        return text
    except ValueError:
        return json.dumps(text)


def _loads(v):
    return json.loads(v) if isinstance(v, str) else v


def _config_out(stream_id: str, cfg: StreamConfig) -> ConfigOut:
    return ConfigOut(**cfg.describe(stream_id))


#: The largest request body the API reads (a config is a few hundred bytes); larger: 413, unread.
MAX_BODY_BYTES = 64 * 1024


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 before any of it is kept beyond
    the limit, whether it announces its length or comes chunked (a client once made the service
    hold a 200 MB JSON body)."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._too_large(send)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            size += len(msg.get("body", b""))
            if size > self.limit:
                return await self._too_large(send)
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _too_large(self, send) -> None:
        detail = json.dumps({"error": "payload_too_large",
                             "detail": f"request bodies are limited to {self.limit} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(detail)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": detail})


def create_app(pool_getter, kv_getter, rate: float = auth.DEFAULT_RATE, open_metrics: bool = False,
               db_probe=None) -> FastAPI:
    """The app.  ``pool_getter()`` returns an asyncpg pool, ``kv_getter()`` the config KV (both awaitable);
    ``rate``: requests a second per token; ``open_metrics``: /metrics without a token; ``db_probe()``:
    readiness's database check, on a connection of its own so that it never queues behind the
    requests' pool (default: a query through the pool)."""
    app = FastAPI(title="aic metrics and control API", version="1",
                  description="Per-batch metrics, rollup summaries, bandwidth statistics and live per-stream "
                              "compression config of an aic pipeline.  Calls under /api/v1/aic need "
                              "`Authorization: Bearer <token>` (`aic token create`).",
                  docs_url=None, redoc_url=None)  # their pages load scripts from a CDN: /docs is ours
    app.add_middleware(BodyLimit)

    @app.get("/docs", include_in_schema=False, response_class=HTMLResponse)
    async def docs() -> HTMLResponse:
        from services.metrics.apidocs import render

        return HTMLResponse(render(app.openapi()))
    limiter = auth.RateLimiter(rate)

    @app.exception_handler(Refused)
    async def _refused(_: Request, exc: Refused):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        if exc.retry_after is not None:
            headers["Retry-After"] = str(max(1, int(exc.retry_after + 0.999)))
        return JSONResponse({"error": exc.error, "detail": exc.detail}, status_code=exc.status, headers=headers)

    @app.exception_handler(Unavailable)
    async def _unavailable(_: Request, exc: Unavailable):
        return JSONResponse({"error": "unavailable", "detail": str(exc)}, status_code=503)

    @app.exception_handler(BadRequest)
    async def _bad_request(_: Request, exc: BadRequest):
        return JSONResponse({"error": "invalid_request", "detail": str(exc)}, status_code=422)

    @app.exception_handler(ConfigError)
    async def _bad_config(_: Request, exc: ConfigError):
        return JSONResponse({"error": "invalid_config", "detail": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors()]
        return JSONResponse({"error": "invalid_request", "detail": detail}, status_code=422)

    async def pool() -> asyncpg.Pool:
        try:
            return await pool_getter()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise Unavailable(f"database: {exc}") from None

    async def db(work, tenant: str | None = None):
        """``work(conn)``, a server that is away answered as 503.  With ``tenant``, in a read-only
        transaction that tells the database whose request this is: connected as aic_reader, row-level
        security then shows only ``tenant``'s rows ('*': every tenant's), a second wall behind the
        queries' own tenant filters."""
        try:
            async with (await pool()).acquire() as conn:
                if tenant is None:
                    return await work(conn)
                async with conn.transaction(readonly=True):
                    await conn.execute("SELECT set_config('aic.tenant', $1, true)", tenant)
                    return await work(conn)
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
            raise Unavailable(f"database: {exc}") from None

    async def fetch(sql: str, *args, tenant: str = auth.ALL_TENANTS) -> list[asyncpg.Record]:
        return await db(lambda conn: conn.fetch(sql, *args), tenant)

    async def kv():
        try:
            return await kv_getter()
        except Exception as exc:  # nats errors of every kind mean the same to a client
            raise Unavailable(f"nats: {exc}") from None

    async def token(request: Request) -> Token:
        """The caller's token, checked: 401 without a working one, 429 over its rate."""
        scheme, _, presented = (request.headers.get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise Refused(401, "unauthorized", "this call needs Authorization: Bearer <token> (aic token create)")
        found = await db(lambda conn: auth.verify(conn, presented.strip()))
        if found is None:
            raise Refused(401, "unauthorized", "the token is unknown, expired or revoked")
        wait = limiter.take(found.id)
        if wait:
            raise Refused(429, "rate_limited", f"over {limiter.rate:g} requests a second for this token", wait)
        return found

    def viewer(t: Token = Depends(token)) -> Token:
        return t

    def operator(t: Token = Depends(token)) -> Token:
        if not t.may("operator"):
            raise Refused(403, "forbidden", f"a {t.role} token may not change configs")
        return t

    def admin(t: Token = Depends(token)) -> Token:
        if not t.may("admin"):
            raise Refused(403, "forbidden", "only an admin token may do this")
        return t

    def reach(t: Token, stream_id: str | None) -> None:
        if stream_id is not None and not t.reaches(stream_id):
            raise Refused(403, "forbidden", f"stream {stream_id} is not of this token's tenant ({t.tenant})")

    @app.get("/healthz", tags=["ops"], summary="The process is alive")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], summary="The database and NATS are reachable (an answer within a second)",
             responses={503: {"description": "a backing server is unreachable: which, and why"}})
    async def readyz():
        async def nats() -> None:
            bucket = await kv()
            nc = getattr(getattr(bucket, "bus", None), "nc", None)
            if nc is not None and not nc.is_connected:
                raise Unavailable("not connected (reconnecting)")

        # Both at once, each bounded: a probe must not wait out a dead server's timeouts.
        problems = dict(zip(("database", "nats"), await asyncio.gather(
            _probe(db_probe() if db_probe else fetch("SELECT 1")), _probe(nats()))))
        problems = {k: v for k, v in problems.items() if v is not None}
        if problems:
            return JSONResponse({"error": "unavailable", "detail": problems}, status_code=503)
        return {"status": "ready"}

    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    app.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=Response,
            dependencies=[] if open_metrics else [Depends(token)], responses={} if open_metrics else _REFUSALS)(metrics)

    @app.get(f"{API}/config", tags=["config"], response_model=list[ConfigOut],
             summary="Per-stream configs (all of the token's tenant, or one stream)",
             responses={404: {"description": "no such stream config"}, **_REFUSALS})
    async def get_config(stream_id: str | None = Query(None, pattern=STREAM_ID), t: Token = Depends(viewer)):
        from nats.js.errors import KeyNotFoundError

        from shared.roles import stream_ids

        reach(t, stream_id)
        bucket = await kv()
        keys = [stream_id] if stream_id else await bucket.stream_ids(stream_ids(t.tenant_filter) if t.tenant_filter else ">")
        out = []
        for key in keys:
            try:
                entry = await bucket.get(key)
            except KeyNotFoundError:
                if stream_id:
                    return JSONResponse({"error": "not_found", "detail": f"no config for stream {stream_id}"}, 404)
                continue
            try:
                out.append(_config_out(key, StreamConfig.from_json(entry.value)))
            except ConfigError as exc:  # written around the API and `aic config`: the server's data, not the request
                log.warning("stored_config_invalid", stream_id=key, error=str(exc))
                if stream_id:
                    return JSONResponse({"error": "stored_config_invalid", "detail": str(exc)}, 500)
        return out

    async def write_config(t: Token, stream_id: str, change) -> ConfigOut:
        """Compute the new config (``change(current)``: ``current()`` parses the stored one, which only
        a merge needs, so that a replace also repairs a stored config that no longer validates), audit,
        then store."""
        from nats.js.errors import KeyNotFoundError

        if not STREAM_ID_RE.match(stream_id):  # (the path's pattern lets a 'default.' prefix through)
            raise Refused(422, "invalid_stream_id", f"stream_id must be {STREAM_ID_RULE}")
        reach(t, stream_id)
        bucket = await kv()
        try:
            before = (await bucket.get(stream_id)).value
        except KeyNotFoundError:
            before = None
        cfg = change(lambda: StreamConfig.from_json(before) if before is not None else StreamConfig())
        after = cfg.to_json()
        # Audited first: a change that is not in the audit never happens.
        await db(lambda conn: auth.audit_config(conn, t, stream_id, "set", _json_text(before), _json_text(after)))
        await bucket.put(stream_id, after)
        log.info("config_set", stream_id=stream_id, token_id=t.id, role=t.role)
        return _config_out(stream_id, cfg)

    def _fields(body: BaseModel, unset: bool) -> dict:
        return body.model_dump(exclude={"stream_id"}, exclude_unset=unset)

    @app.put(f"{API}/config/{{stream_id}}", tags=["config"], response_model=ConfigOut,
             summary="Replace a stream's config: keys left out take the mode's preset (applied by every worker to "
                     "its next batch; audited)",
             responses={400: {"description": "the config does not validate"}, **_REFUSALS})
    async def put_config(body: ConfigFields, stream_id: str = Path(pattern=STREAM_ID), t: Token = Depends(operator)):
        fields = {k: v for k, v in _fields(body, False).items() if v is not None}
        return await write_config(t, stream_id, lambda _: StreamConfig.from_dict(fields))

    @app.patch(f"{API}/config/{{stream_id}}", tags=["config"], response_model=ConfigOut,
               summary="Merge keys into a stream's config, as a JSON merge patch (RFC 7396): a key set to null "
                       "unsets its override, keys left out keep their value; what `aic config set` does (audited)",
               responses={400: {"description": "the config does not validate"}, **_REFUSALS})
    async def patch_config(body: ConfigFields, stream_id: str = Path(pattern=STREAM_ID), t: Token = Depends(operator)):
        return await write_config(t, stream_id, lambda current: current().merged(_fields(body, True)))

    @app.post(f"{API}/config", tags=["config"], response_model=ConfigOut,
              summary="Replace a stream's config named in the body (the older form of PUT /config/{stream_id})",
              responses={400: {"description": "the config does not validate"}, **_REFUSALS})
    async def post_config(body: ConfigBody, t: Token = Depends(operator)):
        fields = {k: v for k, v in _fields(body, False).items() if v is not None}
        return await write_config(t, body.stream_id, lambda _: StreamConfig.from_dict(fields))

    @app.get(f"{API}/audit", tags=["config"], summary="Config changes: who, when, before and after (admin)",
             responses=_REFUSALS)
    async def get_audit(stream_id: str | None = Query(None, pattern=STREAM_ID), limit: int = Query(100, ge=1, le=MAX_PAGE),
                        t: Token = Depends(admin)) -> list[dict]:
        rows = await fetch("SELECT id, at, token_id, token_name, role, stream_id, action, before, after FROM config_audit "
                           "WHERE ($1::text IS NULL OR stream_id = $1) AND ($2::text IS NULL OR aic_tenant(stream_id) = $2) "
                           "ORDER BY id DESC LIMIT $3", stream_id, t.tenant_filter, limit, tenant=t.tenant)
        return [{**_json_row(r), "before": _loads(r["before"]), "after": _loads(r["after"])} for r in rows]

    @app.get(f"{API}/metrics", tags=["metrics"], response_model=MetricsPage,
             summary="Per-batch rows, newest first, filtered and paginated", responses=_REFUSALS)
    async def get_metrics(
        stream_id: str | None = Query(None, pattern=STREAM_ID),
        codec: str | None = Query(None, pattern=r"^[A-Za-z0-9_-]{1,32}$"),
        since: datetime | None = Query(None, description="event time, inclusive (default: 1 hour ago)"),
        until: datetime | None = Query(None, description="event time, exclusive (default: now)"),
        limit: int = Query(100, ge=1, le=MAX_PAGE),
        cursor: str | None = Query(None, max_length=200, description="next_cursor of the previous page"),
        t: Token = Depends(viewer),
    ):
        reach(t, stream_id)
        now = datetime.now(timezone.utc)
        lo, hi = _utc(since, now - timedelta(hours=1)), _utc(until, now)
        after_time, after_id = hi, ""  # (time, batch_id) < (hi, '') is exactly time < hi
        if cursor:
            after_time, after_id = _read_cursor(cursor)
        if lo >= hi:
            raise BadRequest("since must be before until")
        rows = await fetch(
            """SELECT * FROM batch_metrics
               WHERE time >= $1 AND time < $2 AND ($3::text IS NULL OR stream_id = $3)
                 AND ($4::text IS NULL OR codec = $4) AND (time, batch_id) < ($5, $6)
                 AND ($8::text IS NULL OR aic_tenant(stream_id) = $8)
               ORDER BY time DESC, batch_id DESC LIMIT $7""",
            lo, hi, stream_id, codec, after_time, after_id, limit + 1, t.tenant_filter, tenant=t.tenant,
        )
        items = [_json_row(r) for r in rows[:limit]]
        nxt = None
        if len(rows) > limit:
            last = rows[limit - 1]
            nxt = base64.urlsafe_b64encode(json.dumps([last["time"].isoformat(), last["batch_id"]]).encode()).decode()
        return MetricsPage(items=items, next_cursor=nxt)

    @app.get(f"{API}/performance/summary", tags=["metrics"],
             summary="Per codec and mode: batches, bytes, kbps, quality, latency, fallbacks (hourly rollups)",
             responses=_REFUSALS)
    async def summary(
        stream_id: str | None = Query(None, pattern=STREAM_ID),
        since: datetime | None = Query(None, description="default: 24 hours ago"),
        until: datetime | None = Query(None, description="default: now"),
        t: Token = Depends(viewer),
    ) -> list[dict]:
        reach(t, stream_id)
        now = datetime.now(timezone.utc)
        lo, hi = _utc(since, now - timedelta(hours=24)), _utc(until, now)
        if lo >= hi:
            raise BadRequest("since must be before until")
        return await db(lambda conn: performance_summary(conn, lo, hi, stream_id, t.tenant_filter), t.tenant)

    @app.get(f"{API}/stats/bandwidth", tags=["metrics"],
             summary="Bandwidth saved against native, from measured baselines only (sampled batches)",
             responses=_REFUSALS)
    async def bandwidth(stream_id: str | None = Query(None, pattern=STREAM_ID), t: Token = Depends(viewer)) -> list[dict]:
        reach(t, stream_id)
        rows = await fetch("SELECT * FROM v_bandwidth_saved WHERE ($1::text IS NULL OR stream_id = $1) "
                           "AND ($2::text IS NULL OR aic_tenant(stream_id) = $2) ORDER BY stream_id, codec",
                           stream_id, t.tenant_filter, tenant=t.tenant)
        return [_json_row(r) for r in rows]

    return app
