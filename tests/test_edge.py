"""The WebRTC edge: WHIP publishes become the stream's batches, WHEP viewers get its delivered video,
and bad input is refused without disturbing anyone else.  The peers here are aiortc's (fast); the
real browser's run is tests/test_browser.py."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import numpy as np
import pytest

pytest.importorskip("aiortc")

from services.edge.publish import Batcher, ntp_to_unix  # noqa: E402
from services.edge.sdp import OfferError, check_offer  # noqa: E402
from services.edge.server import EdgeService  # noqa: E402
from shared.config import EdgeConfig  # noqa: E402
from shared.embedded import free_port  # noqa: E402
from tests.conftest import compressor, metrics_writer, running, unique, wait_rows  # noqa: E402
from tools import webrtc_peer as peer  # noqa: E402


@contextlib.asynccontextmanager
async def edge(nats_server, **kw):
    """An edge on a free port, with the bus credentials ``aic up`` gives it; yields (base URL, service)."""
    port = free_port()
    service = EdgeService(EdgeConfig(bus=nats_server.client("edge"), port=port, **kw))
    base = f"http://127.0.0.1:{port}"
    async with running(service):
        deadline = time.monotonic() + 20
        async with httpx.AsyncClient() as http:
            while True:
                try:
                    if (await http.get(f"{base}/healthz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "the edge did not start"
                await asyncio.sleep(0.1)
        yield base, service


def pipeline(nats_server, postgres, **compressor_kw):
    """A compressor and the metrics writer, in this process."""
    return running(compressor(nats_server.client("compressor"), **compressor_kw),
                   metrics_writer(nats_server.client("metrics"), postgres.url))


async def settled_rows(url: str, stream_ids: list[str], at_least: int) -> list:
    """The streams' rows once there are ``at_least`` and no more came for two seconds."""
    rows = await wait_rows(url, stream_ids, at_least, timeout=60)
    while True:
        await asyncio.sleep(2)
        more = await wait_rows(url, stream_ids, len(rows))
        if len(more) == len(rows):
            return more
        rows = more


async def publish_frames(base: str, stream_id: str, track, frames: int, token: str | None = None) -> None:
    """A WHIP publish of ``track`` until it sent ``frames`` frames, ended by DELETE."""
    pc, location = await peer.publish(base, stream_id, track, token)
    await wait_for(lambda: track.sent >= frames, 30, f"{frames} frames sent")
    assert await peer.delete(location, token) == 200
    await pc.close()


async def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


# ---------------------------------------------------------------------------------------- pure parts


def test_frames_are_batched_with_the_last_frames_capture_time_and_a_size_change_closes_a_batch():
    import av

    b = Batcher("s", batch_frames=3)
    small, big = av.VideoFrame(32, 16, "yuv420p"), av.VideoFrame(48, 24, "yuv420p")
    out = []
    for i, vf in enumerate([small] * 4 + [big] * 2):
        out += b.add(vf, captured_at=100.0 + i)
    out += b.flush()
    assert [(x.batch_seq, x.frame_count, x.width) for x in out] == [(0, 3, 32), (1, 1, 32), (2, 2, 48)]
    assert [x.captured_at for x in out] == [102.0, 103.0, 105.0]
    assert [x.first_pts for x in out] == [0, 3, 4] and b.resizes == 1
    assert b.flush() == []


def test_an_odd_frame_size_is_cropped_to_even():
    import av

    (fb,) = Batcher("s", batch_frames=1).add(av.VideoFrame(33, 17, "yuv420p"), 1.0)
    assert (fb.width, fb.height) == (32, 16)


async def test_a_gateway_that_takes_nothing_yet_costs_a_bounded_wait_and_leaves_no_gap_in_the_numbers():
    """While the bus is away at the start the gateway reads no batch; the track is still read (aiortc
    would queue every frame), at most ``depth`` batches wait, the oldest go, counted, and the numbers
    handed on stay consecutive."""
    import av
    from aiortc.mediastreams import MediaStreamError

    from services.edge.publish import PublishStats, SenderClock, track_batches

    class Track:
        sent = 0

        async def recv(self):
            if self.sent == 40:
                raise MediaStreamError
            self.sent += 1
            vf = av.VideoFrame(32, 16, "yuv420p")
            vf.pts = self.sent * 3000
            return vf

    track, stats = Track(), PublishStats()
    batches = track_batches(track, Batcher("s", batch_frames=4), SenderClock(object()), 5.0, stats, asyncio.Event(),
                            depth=3)
    first = await batches.__anext__()  # the reader starts; then the gateway is away for a while
    await wait_for(lambda: track.sent == 40, 5, "the track read to its end")
    rest = [fb async for fb in batches]
    assert [fb.batch_seq for fb in [first, *rest]] == list(range(1 + len(rest)))
    assert len(rest) == 3 and stats.unpublished == 10 - 1 - 3 and stats.ended == "peer gone"
    assert first.fps == 30  # measured from the RTP times (3000 ticks a frame)


def test_ntp_time_of_a_sender_report_is_unix_time():
    assert ntp_to_unix((2208988800 + 10) << 32 | (1 << 31)) == 10.5


VIDEO = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"


@pytest.mark.parametrize("body, status, says", [
    (b"hello", 400, "not an SDP offer"),
    (b"\xff\xfe", 400, "UTF-8"),
    ((VIDEO + "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n").encode(), 422, "no video"),
    ((VIDEO + "m=video 9 UDP/TLS/RTP/SAVPF 98 45\r\na=rtpmap:98 VP9/90000\r\na=rtpmap:45 AV1/90000\r\n").encode(), 422,
     "AV1, VP9 only"),
    (b"v=0" + b" " * 70000, 413, "over"),
    ((VIDEO + "m=video\r\n").encode(), 400, "malformed media line"),
])
def test_offers_aic_cannot_use_are_refused_saying_why(body, status, says):
    with pytest.raises(OfferError) as err:
        check_offer(body, "send")
    assert err.value.status == status and says in str(err.value)


def test_a_publish_offer_that_only_receives_video_is_refused():
    sdp = (VIDEO + "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 VP8/90000\r\na=recvonly\r\n").encode()
    with pytest.raises(OfferError, match="VP8 and H264|no codec"):
        check_offer(sdp, "send")
    assert check_offer(sdp, "recv")


# ---------------------------------------------------------------------------------------- with servers


@pytest.mark.slow
async def test_a_whip_publish_becomes_the_streams_batches_one_row_each(nats_server, postgres):
    sid = unique("whip")
    frames = peer.clip(30)
    async with pipeline(nats_server, postgres):
        async with edge(nats_server) as (base, service):
            track = peer.ClipTrack(frames)
            await publish_frames(base, sid, track, 60)
            await wait_for(lambda: not service.edge.publishes, 10, "the session to end")
        rows = await settled_rows(postgres.url, [sid], 1)
    seqs = [r["batch_seq"] for r in rows]
    assert seqs == list(range(len(seqs))) and len(seqs) >= 6  # every batch once, in order, none missing
    assert all(r["status"] == "ok" and r["width"] == 320 and r["height"] == 180 for r in rows)
    assert sum(r["frames"] for r in rows) >= 55
    # Capture times come from the sender's clock: before the row, after the publish began.
    assert all(0 < r["latency_ms"] < 10000 for r in rows)
    # The browser leg loses little: the clip, sent as VP8, decoded at the gateway, coded by x264.
    assert np.median([r["psnr_y"] for r in rows]) > 30


@pytest.mark.slow
async def test_a_whep_viewer_gets_the_delivered_video_while_it_is_published(nats_server, postgres):
    """The viewer joins a stream being published, gets frames of its size a moment later, and the
    session resource dates each frame sent by its capture (for glass-to-viewer latency)."""
    sid = unique("whep")
    async with running(compressor(nats_server.client("compressor"))):
        async with edge(nats_server) as (base, service):
            track = peer.ClipTrack(peer.clip(30))
            pc, location = await peer.publish(base, sid, track)
            await wait_for(lambda: track.sent >= 15, 20, "the publish to start")
            viewer = peer.Viewer()
            r = await viewer.watch(base, sid)
            assert r.status_code == 201 and r.headers["content-type"].startswith("application/sdp")
            await wait_for(lambda: len(viewer.frames) >= 45, 40, "45 frames at the viewer")
            async with httpx.AsyncClient() as http:
                state = (await http.get(viewer.location)).json()
            await viewer.close()
            await peer.delete(location)
            await pc.close()
    sizes = {(vf.width, vf.height) for _, vf in viewer.frames}
    assert sizes == {(320, 180)}
    assert state["batch"]["codec"] and state["sent"], state
    pts, captured, sent = zip(*state["sent"])
    assert list(pts) == sorted(pts) and all(s >= c for c, s in zip(captured, sent))
    assert 0 < np.median(np.subtract(sent, captured)) < 3.0  # coded, delivered and played out within seconds
    # What the viewer shows is the clip: not black, not noise (VP8 of x264 of VP8 of the pattern).
    luma = viewer.frames[-1][1].to_ndarray(format="gray")
    assert 20 < luma.mean() < 235 and luma.std() > 20


@pytest.fixture
async def tokens(postgres):
    """API tokens: an acme operator, an acme viewer, a beta operator; and the reader's database URL."""
    import asyncpg

    from services.metrics.auth import create_token
    from services.metrics.migrations import READER, WRITER, migrate, set_role_passwords

    conn = await asyncpg.connect(postgres.url)
    try:
        await migrate(conn)
        await set_role_passwords(conn, {r: postgres.role_password(r) for r in (WRITER, READER)})
        out = {name: (await create_token(conn, role, tenant, name=name))[1]
               for name, role, tenant in (("op", "operator", "acme"), ("viewer", "viewer", "acme"),
                                          ("beta", "operator", "beta"))}
    finally:
        await conn.close()
    return out, postgres.role_url(READER)


@pytest.mark.slow
async def test_tokens_decide_who_publishes_and_watches(nats_server, tokens):
    secrets, db = tokens
    sid = f"acme.{unique('cam')}"
    async with edge(nats_server, database_url=db, rate=50) as (base, service):
        async def post(path, token=None, sdp=None):
            sdp = sdp or (VIDEO + "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 VP8/90000\r\na=sendonly\r\n")
            headers = {"Content-Type": "application/sdp", **({"Authorization": f"Bearer {token}"} if token else {})}
            async with httpx.AsyncClient() as http:
                return await http.post(f"{base}{path}", content=sdp, headers=headers)

        r = await post(f"/whip/{sid}")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert (await post(f"/whip/{sid}", "aic_nothere_x")).status_code == 401
        r = await post(f"/whip/{sid}", secrets["viewer"])  # a viewer may watch, not publish
        assert r.status_code == 403 and "viewer" in r.text
        r = await post(f"/whip/{sid}", secrets["beta"])  # another tenant's stream
        assert r.status_code == 403 and "tenant" in r.text
        assert not service.edge.publishes
        # The right token: a real publish (an aiortc peer), and a viewer token may watch it.
        track = peer.ClipTrack(peer.clip(10))
        pc, location = await peer.publish(base, sid, track, token=secrets["op"])
        assert (await peer.delete(location)) == 401  # ending it needs the token too
        viewer = peer.Viewer()
        assert (await viewer.watch(base, sid, secrets["viewer"])).status_code == 201
        await viewer.close()
        assert await peer.delete(location, secrets["op"]) == 200
        await pc.close()


@pytest.mark.slow
async def test_without_a_token_database_only_loopback_clients_are_served(nats_server):
    from services.edge.server import Edge, create_app

    app = create_app(Edge(EdgeConfig(bus=nats_server.client("edge"))))
    transport = httpx.ASGITransport(app=app, client=("192.0.2.7", 5000))  # a client from another machine
    async with httpx.AsyncClient(transport=transport, base_url="http://edge") as http:
        r = await http.post("/whip/cam1", content=b"v=0", headers={"Content-Type": "application/sdp"})
        assert r.status_code == 403 and "own machine" in r.text
        assert (await http.get("/publish")).status_code == 200  # the pages are public; what they do is not
        r = await http.get("/whep/acme.cam1")  # a WHEP URL opened in a browser: the page that plays it
        assert r.status_code == 303 and r.headers["location"] == "/watch?stream=acme.cam1"
    # A page elsewhere whose host name was made to resolve to 127.0.0.1 (DNS rebinding) is not local.
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://evil.example:8890") as http:
        r = await http.post("/whip/cam1", content=b"v=0", headers={"Content-Type": "application/sdp"})
        assert r.status_code == 403 and "localhost" in r.text


@pytest.mark.slow
async def test_bad_requests_are_refused_and_the_live_publish_goes_on(nats_server):
    """A second publish of a live stream id (409), malformed and unusable offers, the wrong content
    type, trickle ICE, and a flood of POSTs (429): each refused, none disturbing the publish that is on."""
    sid = unique("live")
    async with edge(nats_server, rate=2) as (base, service):
        track = peer.ClipTrack(peer.clip(10))
        pc, location = await peer.publish(base, sid, track)
        await wait_for(lambda: track.sent >= 10, 20, "the publish to start")
        answers = []
        async with httpx.AsyncClient() as http:
            async def post(path, body, ctype="application/sdp"):
                answers.append((await http.post(f"{base}{path}", content=body, headers={"Content-Type": ctype})))
                return answers[-1]
            await asyncio.sleep(2)  # (a full bucket of session requests)
            second = await post(f"/whip/{sid}", (VIDEO + "m=video 9 UDP/TLS/RTP/SAVPF 96\r\n"
                                                 "a=rtpmap:96 VP8/90000\r\na=sendonly\r\n").encode())
            assert second.status_code == 409 and "published already" in second.text
            assert (await post("/whip/other", b"v=0\r\ngarbage")).status_code == 400
            assert (await post("/whip/other", b"v=0", "text/plain")).status_code == 415
            assert (await post("/whip/bad id!", b"v=0")).status_code == 400
            statuses = [(await post("/whip/other", b"v=0")).status_code for _ in range(10)]
            assert 429 in statuses and statuses.count(429) >= 5
            flood = next(a for a in answers if a.status_code == 429)
            assert int(flood.headers["retry-after"]) >= 1
            assert (await http.patch(location, content=b"a=candidate")).status_code == 405
        sent_before = track.sent
        await wait_for(lambda: track.sent >= sent_before + 30, 20, "the publish to go on")
        assert service.edge.publishes[sid].stats.frames >= sent_before  # frames still arrive
        await peer.delete(location)
        await pc.close()


@pytest.mark.slow
async def test_a_peer_that_vanishes_ends_its_session_and_its_last_partial_batch_is_published(nats_server, postgres):
    """No DELETE, no BYE: the peer just stops (a closed laptop).  The session ends after the idle
    bound, the frames of its unfinished batch go out as a shorter batch, and one line says why."""
    sid = unique("gone")
    async with pipeline(nats_server, postgres):
        async with edge(nats_server, idle_s=1.0, batch_frames=8) as (base, service):
            track = peer.ClipTrack(peer.clip(10))
            pc, location = await peer.publish(base, sid, track)
            await wait_for(lambda: track.sent >= 20, 20, "frames sent")
            # Freeze the peer: its track stops producing, and nothing tells the edge.
            track.recv = lambda: asyncio.sleep(3600)
            await wait_for(lambda: sid not in service.edge.publishes, 15, "the session to end")
            await pc.close()
        rows = await settled_rows(postgres.url, [sid], 3)
    counts = [r["frames"] for r in rows]
    assert [r["batch_seq"] for r in rows] == list(range(len(rows)))
    assert all(c == 8 for c in counts[:-1]) and 1 <= counts[-1] <= 8 and sum(counts) >= 20


@pytest.mark.slow
async def test_two_publishers_at_once_make_two_streams(nats_server, postgres):
    a, b = unique("two-a"), unique("two-b")
    async with pipeline(nats_server, postgres):
        async with edge(nats_server) as (base, service):
            ta, tb = peer.ClipTrack(peer.clip(10)), peer.ClipTrack(peer.clip(10, "256x144"))
            await asyncio.gather(publish_frames(base, a, ta, 48), publish_frames(base, b, tb, 48))
        rows = await settled_rows(postgres.url, [a, b], 10)
    for sid, width in ((a, 320), (b, 256)):
        mine = [r for r in rows if r["stream_id"] == sid]
        assert [r["batch_seq"] for r in mine] == list(range(len(mine))) and len(mine) >= 5
        assert {r["width"] for r in mine} == {width}


@pytest.mark.slow
async def test_a_resolution_change_mid_publish_starts_a_new_batch_at_the_new_size(nats_server, postgres):
    """Browsers scale their video down under congestion: the batch before the change is closed
    (shorter), the next starts at the new size, and every frame is in a row of its own size."""
    sid = unique("resize")
    sizes = [(320, 180)] * 21 + [(256, 144)] * 40
    async with pipeline(nats_server, postgres):
        async with edge(nats_server, batch_frames=8) as (base, service):
            track = peer.ClipTrack(peer.clip(10), sizes=sizes)
            await publish_frames(base, sid, track, 60)
        rows = await settled_rows(postgres.url, [sid], 6)
    widths = [r["width"] for r in rows]
    assert [r["batch_seq"] for r in rows] == list(range(len(rows)))
    assert set(widths) == {320, 256} and widths == sorted(widths, reverse=True)  # one change, in order
    change = widths.index(256)
    assert rows[change - 1]["frames"] < 8  # the batch the change closed early


@pytest.mark.slow
async def test_the_edge_serves_https_with_a_certificate_from_the_stacks_ca(nats_server):
    """Browsers give a page its camera on HTTPS (or localhost) only: ``aic up --https`` serves the
    edge with a certificate from the CA that signs NATS's, as it does the API."""
    import ssl

    from shared.pki import ensure_server_tls

    tls = ensure_server_tls(nats_server.ca_file.parent, stem="edge")
    port = free_port()
    service = EdgeService(EdgeConfig(bus=nats_server.client("edge"), port=port,
                                     tls=(str(tls.cert_file), str(tls.key_file))))
    trust = ssl.create_default_context(cafile=str(nats_server.ca_file))
    async with running(service):
        async with httpx.AsyncClient(verify=trust) as http:
            deadline = time.monotonic() + 20
            while True:
                try:
                    r = await http.get(f"https://127.0.0.1:{port}/publish")
                    break
                except httpx.ConnectError:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)
        assert r.status_code == 200 and "Publish to aic" in r.text
        with pytest.raises(httpx.HTTPError):
            async with httpx.AsyncClient() as plain:
                await plain.get(f"http://127.0.0.1:{port}/healthz", timeout=2)


@pytest.mark.slow
async def test_a_peer_that_never_connects_is_given_up_after_the_connect_bound(nats_server):
    """The peer posts its offer and takes the answer, but ICE never completes (it went away at
    once): the session ends after ``connect_s``, the stream id is free again, and one line says why."""
    from aiortc import RTCConfiguration, RTCPeerConnection

    sid = unique("noice")
    async with edge(nats_server, connect_s=2.0) as (base, service):
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver(peer.ClipTrack(peer.clip(5)), direction="sendonly")
        await pc.setLocalDescription(await pc.createOffer())
        await pc.close()  # gone before any connectivity check: its candidates answer nothing
        async with httpx.AsyncClient() as http:
            r = await http.post(f"{base}/whip/{sid}", content=pc.localDescription.sdp,
                                headers={"Content-Type": "application/sdp"})
        assert r.status_code == 201 and sid in service.edge.publishes
        session = service.edge.publishes[sid]
        await wait_for(lambda: sid not in service.edge.publishes, 40, "the session to be given up")
        assert session.stats.frames == 0 and "connect" in session.stats.ended
        # The id is free: a real publish of it goes ahead.
        await publish_frames(base, sid, peer.ClipTrack(peer.clip(5)), 5)


@pytest.mark.slow
async def test_a_second_publish_of_a_stream_continues_its_numbering(nats_server, postgres):
    sid = unique("again")
    async with pipeline(nats_server, postgres):
        async with edge(nats_server) as (base, service):
            for _ in range(2):
                track = peer.ClipTrack(peer.clip(10))
                await publish_frames(base, sid, track, 24)
        rows = await settled_rows(postgres.url, [sid], 5)
    assert [r["batch_seq"] for r in rows] == list(range(len(rows))) and len(rows) >= 5
