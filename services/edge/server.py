"""``aic edge``: the WebRTC edge.  Browsers, OBS and GStreamer publish over WHIP (RFC 9725) and watch
over WHEP; the pages ``/publish`` and ``/watch`` do both from a browser.

==========================  =========================================================================
``POST /whip/<stream>``     an SDP offer (``application/sdp``) → 201, the answer, ``Location`` of the
                            session; its video is published as the stream's frame batches
``DELETE <Location>``       ends the session (its last, partial batch is published)
``POST /whep/<stream>``     an SDP offer to receive → 201, the answer: the stream's delivered video
``GET <Location>``          a WHEP session's state: frames sent with their capture times (latency)
``GET /whep/<stream>``      (and ``/whip/``) 303 to the page that watches (publishes) it
``GET /api/v1/aic/metrics`` the metrics API's rows, passed through with the caller's token
==========================  =========================================================================

Who may: with a token database (``--database-url``, the API's tokens of ``aic token``), a bearer
token on every request: operator or admin to publish, viewer or more to watch, of the stream's
tenant.  Without one, only clients on this machine (loopback) are served.  Session POSTs are
rate-limited per client address; publishes and viewers are capped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import ipaddress
import os
import ssl
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from services.edge.publish import Batcher, PublishStats, SenderClock, track_batches
from services.edge.sdp import MAX_SDP_BYTES, OfferError, check_offer
from services.edge.watch import DeliveredTrack, StreamTap
from services.metrics.auth import RateLimiter, Token, verify
from shared.bus import Bus
from shared.config import EdgeConfig
from shared.logs import get_logger
from shared.schemas import STREAM_ID_RE, STREAM_ID_RULE

log = get_logger("edge")

SESSIONS = Gauge("aic_edge_sessions", "Live WebRTC sessions", ["kind"])
REFUSED = Counter("aic_edge_refused_total", "Session requests refused, by HTTP status", ["status"])
CAPTURE_LAG = Histogram("aic_edge_capture_lag_seconds", "A published frame's arrival at the edge less its capture "
                        "(the sender's clock): the browser leg's latency",
                        buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

PAGES = Path(__file__).parent / "pages"
#: How long a token checked against the database is taken as checked.
TOKEN_CACHE_S = 10.0
MAX_ROWS_BYTES = 1 << 20


class Refused(Exception):
    """An HTTP refusal: status, a message for the client, and headers."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


def _loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allow_loopback_candidates() -> None:
    """aioice gathers no candidate on 127.0.0.1, so a peer on this machine that offers only loopback
    candidates (Chromium with --allow-loopback-in-peer-connection, a machine without a network)
    finds no pair: add it to the addresses it gathers on."""
    import aioice.ice

    if getattr(aioice.ice.get_host_addresses, "_aic", False):
        return
    gather = aioice.ice.get_host_addresses

    def with_loopback(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        found = gather(use_ipv4, use_ipv6)
        return found + ["127.0.0.1"] if use_ipv4 and "127.0.0.1" not in found else found

    with_loopback._aic = True
    aioice.ice.get_host_addresses = with_loopback


@dataclass
class Session:
    id: str
    stream_id: str
    kind: str  # "whip" or "whep"
    pc: object
    peer: str
    started: float = field(default_factory=time.monotonic)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    connected: asyncio.Event = field(default_factory=asyncio.Event)  # ICE and DTLS up
    task: asyncio.Task | None = None
    stats: PublishStats = field(default_factory=PublishStats)
    track: DeliveredTrack | None = None
    sink: object = None  # a viewer's MediaBlackhole

    @property
    def location(self) -> str:
        return f"/{self.kind}/{self.stream_id}/{self.id}"


class Edge:
    """The edge's state: its bus connection, token check, and live sessions."""

    def __init__(self, cfg: EdgeConfig, bus: Bus | None = None):
        self.cfg, self.bus = cfg, bus
        self.publishes: dict[str, Session] = {}  # by stream id: one publisher per stream
        self.viewers: dict[str, Session] = {}  # by session id
        self.taps: dict[str, StreamTap] = {}
        self.limiter = RateLimiter(cfg.rate)  # session POSTs (a burst of twice the rate)
        self.reads = RateLimiter(10 * cfg.rate)  # session GETs, DELETEs, rows: cheap, but not free
        self._pool = None
        self._pool_lock = asyncio.Lock()
        self._joining = 0  # viewers whose offers are being answered
        self._verified: dict[str, tuple[float, Token | None]] = {}  # digest of a token -> (until, token)
        # The rows' pass-through blocks a thread per request: its own two, not the loop's default
        # executor, which aiortc's encoders and the taps' decoders use.
        self._rows_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="edge-rows")

    # ------------------------------------------------------------------ who may

    async def _token(self, presented: str) -> Token | None:
        """The token, checked against the database at most every ``TOKEN_CACHE_S`` (a revocation takes
        that long to reach the edge; a flood of made-up tokens costs one query each, then none)."""
        import asyncpg

        key, now = hashlib.sha256(presented.encode()).hexdigest(), time.monotonic()
        cached = self._verified.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        async with self._pool_lock:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(self.cfg.database_url, min_size=1, max_size=2, timeout=5,
                                                       command_timeout=5)
        async with self._pool.acquire(timeout=5) as conn:
            token = await verify(conn, presented)
        if len(self._verified) >= 10000:
            self._verified = {k: v for k, v in self._verified.items() if v[0] > now}
            if len(self._verified) >= 10000:
                self._verified.clear()
        self._verified[key] = (now + TOKEN_CACHE_S, token)
        return token

    async def admit(self, request: Request, role: str, stream_id: str) -> Token | None:
        """The caller's token if it may act as ``role`` on ``stream_id`` (None without a token
        database, for a loopback client); else :class:`Refused`."""
        if not STREAM_ID_RE.match(stream_id):
            raise Refused(400, f"stream id {stream_id!r}: must be {STREAM_ID_RULE}")
        if self.cfg.database_url is None:
            self.local_only(request)
            return None
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise Refused(401, "a bearer token is needed (aic token create)", {"WWW-Authenticate": "Bearer"})
        try:
            token = await self._token(presented.strip())
        except Exception as exc:
            log.warning("token_check_failed", error=type(exc).__name__)
            raise Refused(503, "the token database is not reachable; try again", {"Retry-After": "5"}) from None
        if token is None:
            raise Refused(401, "the token is unknown, revoked or expired", {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        if not token.may(role):
            raise Refused(403, f"a {token.role} token may not {'publish' if role == 'operator' else 'watch'} "
                               f"(needs {role} or more)")
        if not token.reaches(stream_id):
            raise Refused(403, f"the token's tenant {token.tenant!r} does not reach stream {stream_id!r}")
        return token

    def local_only(self, request: Request) -> None:
        """Without tokens: a client on this machine, asking for this machine by name.  (The name too: a
        web page whose host name was made to resolve to 127.0.0.1 — DNS rebinding — would otherwise
        reach the edge from the user's browser as a local client.)"""
        host = request.client.host if request.client else None
        name = request.headers.get("host", "").rsplit(":", 1)[0].strip("[]").lower()
        if not _loopback(host) or name not in {"localhost", "127.0.0.1", "::1", self.cfg.host.lower()}:
            raise Refused(403, "this edge runs without API tokens (no --database-url): it serves clients on "
                               "its own machine only, that call it localhost or 127.0.0.1")

    def throttle(self, request: Request, limiter: RateLimiter | None = None) -> None:
        host = request.client.host if request.client else "?"
        wait = (limiter or self.limiter).take(host)
        if wait:
            raise Refused(429, "too many session requests from this address", {"Retry-After": str(max(1, round(wait)))})

    # ------------------------------------------------------------------ WHIP

    async def publish(self, request: Request, stream_id: str) -> Response:
        self.throttle(request)
        await self.admit(request, "operator", stream_id)
        offer = check_offer(await _body(request), "send")
        if stream_id in self.publishes:
            raise Refused(409, f"stream {stream_id!r} is being published already (DELETE that session first)")
        if len(self.publishes) >= self.cfg.max_publishes:
            raise Refused(503, f"this edge takes {self.cfg.max_publishes} publishes at once", {"Retry-After": "10"})
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
        from aiortc.contrib.media import MediaBlackhole

        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # no public STUN server: ICE on host addresses
        session = Session(secrets.token_urlsafe(12), stream_id, "whip", pc, _peer(request))
        self.publishes[stream_id] = session  # before any await: a second POST is a 409 from now on
        video: asyncio.Future = asyncio.get_running_loop().create_future()
        sink = MediaBlackhole()  # audio (OBS sends it) is read and dropped: aic carries video

        @pc.on("track")
        def on_track(track):
            if track.kind == "video" and not video.done():
                receiver = next((t.receiver for t in pc.getTransceivers() if t.receiver.track is track), None)
                video.set_result((track, SenderClock(receiver)))
            else:
                sink.addTrack(track)

        @pc.on("connectionstatechange")
        async def on_state():
            if pc.connectionState == "connected":
                session.connected.set()
            elif pc.connectionState in ("failed", "closed"):
                session.stats.ended = session.stats.ended or ("peer gone" if pc.connectionState == "failed" else "")
                session.ended.set()

        try:
            await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:
            self.publishes.pop(stream_id, None)
            await pc.close()
            raise Refused(400, f"the offer could not be answered: {type(exc).__name__}: {str(exc)[:200]}") from None
        await sink.start()
        session.task = asyncio.create_task(self._run_publish(session, video, sink), name=f"whip-{stream_id}")
        SESSIONS.labels("whip").inc()
        log.info("whip_session_started", stream_id=stream_id, session=session.id, peer=session.peer)
        return Response(pc.localDescription.sdp, 201, media_type="application/sdp",
                        headers={"Location": session.location, "ETag": f'"{session.id}"'})

    async def _run_publish(self, session: Session, video: asyncio.Future, sink) -> None:
        from services.ingest.gateway import BatchNumberError, BusOutage, ingest

        pc, stats, error = session.pc, session.stats, None
        ingested = None
        try:
            done, _ = await asyncio.wait({video, asyncio.ensure_future(session.ended.wait())},
                                         timeout=self.cfg.connect_s, return_when=asyncio.FIRST_COMPLETED)
            if video not in done:
                stats.ended = stats.ended or ("deleted" if session.ended.is_set() else "no video before the connect timeout")
                return
            track, clock = video.result()
            # ICE and DTLS up in time, or the session ends (a peer that answered and vanished).
            if not await _first(session.connected, session.ended, timeout=self.cfg.connect_s):
                stats.ended = stats.ended or "ICE or DTLS did not connect before the connect timeout"
                return
            if session.ended.is_set():
                return  # deleted, or the peer gone, before a frame: nothing to publish
            batcher = Batcher(session.stream_id, self.cfg.batch_frames, Fraction(self.cfg.fps))
            batches = track_batches(track, batcher, clock, self.cfg.idle_s, stats, session.ended,
                                    depth=max(1, self.cfg.buffer_batches))
            ingested = await ingest(self.bus, f"whip:{session.peer}", session.stream_id, self.cfg.batch_frames,
                                    progress=False, outage_s=self.cfg.outage_s,
                                    buffer_batches=self.cfg.buffer_batches, batches=batches)
        except (BatchNumberError, BusOutage) as exc:
            error = str(exc)
        except asyncio.CancelledError:
            stats.ended = stats.ended or "shutdown"
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            session.ended.set()
            await pc.close()
            await sink.stop()
            if self.publishes.get(session.stream_id) is session:
                del self.publishes[session.stream_id]
            SESSIONS.labels("whip").dec()
            lags = sorted(stats.capture_lag_s)
            for lag in lags:
                CAPTURE_LAG.observe(lag)
            # one line per session, whatever ended it
            (log.error if error else log.info)(
                "whip_session_ended", stream_id=session.stream_id, session=session.id, peer=session.peer,
                reason=stats.ended or ("error" if error else "track ended"), frames=stats.frames,
                batches=ingested.batches if ingested else stats.batches,
                dropped=ingested.dropped if ingested else 0, unpublished=stats.unpublished, resizes=stats.resizes,
                capture_lag_ms_p50=round(1000 * lags[len(lags) // 2], 1) if lags else None,
                seconds=round(time.monotonic() - session.started, 1), **({"error": error} if error else {}))

    async def end_publish(self, request: Request, stream_id: str, session_id: str) -> Response:
        self.throttle(request, self.reads)
        await self.admit(request, "operator", stream_id)
        session = self.publishes.get(stream_id)
        if session is None or not secrets.compare_digest(session.id.encode(), session_id.encode()):
            raise Refused(404, "no such session")
        session.stats.ended = "deleted"
        session.ended.set()
        await asyncio.wait({session.task}, timeout=10)
        return Response(status_code=200)

    # ------------------------------------------------------------------ WHEP

    async def watch(self, request: Request, stream_id: str) -> Response:
        self.throttle(request)
        await self.admit(request, "viewer", stream_id)
        offer = check_offer(await _body(request), "recv")
        if len(self.viewers) + self._joining >= self.cfg.max_viewers:
            raise Refused(503, f"this edge serves {self.cfg.max_viewers} viewers at once", {"Retry-After": "10"})
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
        from aiortc.contrib.media import MediaBlackhole

        track = DeliveredTrack()
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        session = Session(secrets.token_urlsafe(12), stream_id, "whep", pc, _peer(request), track=track)
        sink = session.sink = MediaBlackhole()  # what a viewer's offer would send us is read and dropped
        pc.on("track", sink.addTrack)
        self._joining += 1  # (the cap holds while offers are being answered)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
            for t in pc.getTransceivers():
                if t.kind == "video" and t.sender.track is None:
                    t.sender.replaceTrack(track)
                    t.direction = "sendonly"
                    break
            await pc.setLocalDescription(await pc.createAnswer())
            await sink.start()
        except Exception as exc:
            await pc.close()
            raise Refused(400, f"the offer could not be answered: {type(exc).__name__}: {str(exc)[:200]}") from None
        finally:
            self._joining -= 1
        # From here to the response nothing awaits: the tap found (or made) is the one that runs.
        tap = self.taps.get(stream_id)
        if tap is None:
            tap = self.taps[stream_id] = StreamTap(self.bus, stream_id)
        track.tap = tap
        self.viewers[session.id] = session
        tap.viewers.add(track)
        tap.start()

        @pc.on("connectionstatechange")
        async def on_state():
            if pc.connectionState in ("failed", "closed"):
                await self._end_view(session, "peer gone" if pc.connectionState == "failed" else "closed")

        session.task = asyncio.create_task(self._view_deadline(session), name=f"whep-{session.id}")
        SESSIONS.labels("whep").inc()
        log.info("whep_session_started", stream_id=stream_id, session=session.id, peer=session.peer)
        return Response(pc.localDescription.sdp, 201, media_type="application/sdp",
                        headers={"Location": session.location, "ETag": f'"{session.id}"'})

    async def _view_deadline(self, session: Session) -> None:
        await asyncio.sleep(self.cfg.connect_s)
        if session.pc.connectionState != "connected":
            await self._end_view(session, "ICE or DTLS did not connect before the connect timeout")

    async def _end_view(self, session: Session, reason: str) -> None:
        if self.viewers.pop(session.id, None) is None:
            return
        SESSIONS.labels("whep").dec()
        session.track.stop()
        await session.pc.close()
        if session.sink is not None:
            await session.sink.stop()
        tap = self.taps.get(session.stream_id)
        if tap is not None and not tap.viewers:
            del self.taps[session.stream_id]
            await tap.close()
        log.info("whep_session_ended", stream_id=session.stream_id, session=session.id, peer=session.peer,
                 reason=reason, frames=len(session.track.sent), dropped=session.track.dropped,
                 seconds=round(time.monotonic() - session.started, 1))

    def _viewer(self, stream_id: str, session_id: str) -> Session:
        session = self.viewers.get(session_id)
        if session is None or session.stream_id != stream_id:
            raise Refused(404, "no such session")
        return session

    async def view_state(self, request: Request, stream_id: str, session_id: str) -> Response:
        self.throttle(request, self.reads)
        await self.admit(request, "viewer", stream_id)
        s = self._viewer(stream_id, session_id)
        tap = self.taps.get(stream_id)
        return JSONResponse({
            "stream_id": stream_id, "state": s.pc.connectionState, "dropped": s.track.dropped,
            # the last frames sent: [pts (90 kHz: the RTP timestamp less its random origin), captured, sent]
            "sent": [list(x) for x in s.track.sent],
            "batch": tap.last if tap else None,
            "undecodable": tap.stats.undecodable[-20:] if tap else [],
        })

    async def end_view(self, request: Request, stream_id: str, session_id: str) -> Response:
        self.throttle(request, self.reads)
        await self.admit(request, "viewer", stream_id)
        await self._end_view(self._viewer(stream_id, session_id), "deleted")
        return Response(status_code=200)

    # ------------------------------------------------------------------ the rows beside the video

    async def rows(self, request: Request) -> Response:
        """``GET /api/v1/aic/metrics``: the metrics API's answer, passed through with the caller's token
        (the API checks it), so that the watch page needs one origin only."""
        self.throttle(request, self.reads)
        if self.cfg.api_url is None:
            raise Refused(404, "this edge was started without --api-url: no metrics to show")
        if self.cfg.database_url is None:
            self.local_only(request)
        elif not request.headers.get("authorization", "").lower().startswith("bearer "):
            raise Refused(401, "a bearer token is needed (aic token create)", {"WWW-Authenticate": "Bearer"})
        if len(request.url.query) > 1000:
            raise Refused(414, "the query is too long")
        url = f"{self.cfg.api_url.rstrip('/')}/api/v1/aic/metrics?{request.url.query}"
        headers = {"Authorization": request.headers["authorization"]} if "authorization" in request.headers else {}

        def get() -> tuple[int, bytes]:
            ca = os.environ.get("AIC_API_CA")  # the CA of an API served over HTTPS (aic up --https)
            context = ssl.create_default_context(cafile=ca) if ca and url.startswith("https:") else None
            # No redirects: the caller's token goes to the API and nowhere else.
            opener = urllib.request.build_opener(_NoRedirect, urllib.request.HTTPSHandler(context=context))
            try:
                with opener.open(urllib.request.Request(url, headers=headers), timeout=5) as r:
                    status, body = r.status, r.read(MAX_ROWS_BYTES + 1)
            except urllib.error.HTTPError as e:
                status, body = e.code, e.read(1 << 16)
            if len(body) > MAX_ROWS_BYTES:
                return 502, b'{"detail": "the metrics API answered more than the edge passes on"}'
            return status, body

        try:
            status, body = await asyncio.get_running_loop().run_in_executor(self._rows_pool, get)
        except Exception as exc:  # (unreachable, a broken answer, a URL it cannot build)
            log.warning("rows_unavailable", error=type(exc).__name__)
            raise Refused(502, "the metrics API is not reachable") from None
        return Response(body, status, media_type="application/json")

    # ------------------------------------------------------------------ lifecycle

    async def close(self) -> None:
        """End every session: publishes publish their last batch, viewers are hung up."""
        for s in list(self.publishes.values()):
            s.stats.ended = "shutdown"
            s.ended.set()
        tasks = [s.task for s in self.publishes.values() if s.task]
        if tasks:
            await asyncio.wait(tasks, timeout=15)
        for s in list(self.viewers.values()):
            await self._end_view(s, "shutdown")
        if self._pool is not None:
            await self._pool.close()
        self._rows_pool.shutdown(wait=False)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


async def _first(*events: asyncio.Event, timeout: float) -> bool:
    """Whether one of ``events`` was set within ``timeout`` seconds."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        return bool(done)
    finally:
        for w in waits:
            w.cancel()


async def _body(request: Request) -> bytes:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/sdp":
        raise Refused(415, f"the offer must be sent as application/sdp (got {ctype or 'no content type'})")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_SDP_BYTES:
            raise Refused(413, f"the offer is over {MAX_SDP_BYTES} bytes")
    return body


def _peer(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "?"


def create_app(edge: Edge) -> Starlette:
    """The edge's HTTP app (WHIP, WHEP, the pages)."""

    def handler(fn):
        async def endpoint(request: Request) -> Response:
            try:
                return await fn(request, **request.path_params)
            except Refused as exc:
                REFUSED.labels(str(exc.status)).inc()
                return PlainTextResponse(str(exc) + "\n", exc.status, headers=exc.headers)
            except OfferError as exc:
                REFUSED.labels(str(exc.status)).inc()
                return PlainTextResponse(str(exc) + "\n", exc.status)
        return endpoint

    def page(name: str, media_type: str = "text/html"):
        async def serve(request: Request) -> Response:
            return FileResponse(PAGES / name, media_type=media_type,
                                headers={"Cache-Control": "no-store", "Content-Security-Policy":
                                         "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                                         "script-src 'self' 'unsafe-inline'; media-src 'self' blob:"})
        return serve

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "publishes": len(edge.publishes), "viewers": len(edge.viewers)})

    async def options(request: Request, **_) -> Response:
        # WHIP/WHEP clients may ask first; trickle ICE (PATCH) is not offered: gathering is complete.
        return Response(status_code=204, headers={"Allow": "POST, OPTIONS", "Accept-Post": "application/sdp"})

    async def to_page(request: Request) -> Response:
        # A person who opens a WHIP or WHEP URL in a browser gets the page that speaks it.
        page = "publish" if request.url.path.startswith("/whip/") else "watch"
        stream = urllib.parse.quote(request.path_params["stream_id"], safe="")
        return RedirectResponse(f"/{page}?stream={stream}", 303)

    async def no_trickle(request: Request, **_) -> Response:
        return PlainTextResponse("trickle ICE is not supported: send a complete offer\n", 405,
                                 headers={"Allow": "GET, DELETE" if "/whep/" in request.url.path else "DELETE"})

    routes = [
        Route("/", page("index.html")), Route("/publish", page("publish.html")), Route("/watch", page("watch.html")),
        Route("/session.js", page("session.js", "text/javascript")),
        Route("/healthz", healthz),
        Route("/whip/{stream_id}", handler(edge.publish), methods=["POST"]),
        Route("/whip/{stream_id}", options, methods=["OPTIONS"]),
        Route("/whip/{stream_id}", to_page, methods=["GET"]),
        Route("/whip/{stream_id}/{session_id}", handler(edge.end_publish), methods=["DELETE"]),
        Route("/whip/{stream_id}/{session_id}", no_trickle, methods=["PATCH"]),
        Route("/whep/{stream_id}", handler(edge.watch), methods=["POST"]),
        Route("/whep/{stream_id}", options, methods=["OPTIONS"]),
        Route("/whep/{stream_id}", to_page, methods=["GET"]),
        Route("/whep/{stream_id}/{session_id}", handler(edge.view_state), methods=["GET"]),
        Route("/whep/{stream_id}/{session_id}", handler(edge.end_view), methods=["DELETE"]),
        Route("/whep/{stream_id}/{session_id}", no_trickle, methods=["PATCH"]),
        Route("/api/v1/aic/metrics", handler(edge.rows), methods=["GET"]),
    ]
    return Starlette(routes=routes)


class EdgeService:
    """``run(stop)``: the edge's HTTP server until ``stop``; then every session ends cleanly."""

    def __init__(self, cfg: EdgeConfig):
        self.cfg = cfg
        self.edge: Edge | None = None
        self.server = None

    async def run(self, stop: asyncio.Event) -> int:
        import uvicorn

        allow_loopback_candidates()
        bus = await Bus.connect_until(self.cfg.bus, name="aic-edge", stop=stop)
        if bus is None:
            return 0
        self.edge = Edge(self.cfg, bus)
        tls = dict(ssl_certfile=self.cfg.tls[0], ssl_keyfile=self.cfg.tls[1]) if self.cfg.tls else {}
        config = uvicorn.Config(create_app(self.edge), host=self.cfg.host, port=self.cfg.port, log_level="warning",
                                lifespan="off", access_log=False, **tls)
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # run_service owns the signals
        serving = asyncio.create_task(self.server.serve())
        log.info("edge_started", url=f"{'https' if self.cfg.tls else 'http'}://{self.cfg.host}:{self.cfg.port}", tokens=self.cfg.database_url is not None,
                 publish="/publish", watch="/watch")
        try:
            waiter = asyncio.ensure_future(stop.wait())
            await asyncio.wait({serving, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if serving.done():
                serving.result()  # (a port taken: the error, not a silent exit)
                return 1
        finally:
            await self.edge.close()
            self.server.should_exit = True
            await asyncio.gather(serving, return_exceptions=True)
            await bus.close()
        return 0


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``PORT``) → (host, port)."""
    host, _, port = text.rpartition(":")
    try:
        number = int(port)
        if not 0 < number < 65536:
            raise ValueError
    except ValueError:
        raise ValueError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8890") from None
    return (host.strip("[]") or "127.0.0.1"), number


__all__ = ["Edge", "EdgeService", "create_app", "parse_listen"]
