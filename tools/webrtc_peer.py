"""A WHIP/WHEP client in Python (aiortc), for the edge's tests and benchmarks: it publishes a clip's
frames as a camera would, or watches a stream and keeps the frames it receives."""

from __future__ import annotations

import asyncio
import fractions
import time

import av
import httpx
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription

RTP_CLOCK = 90000


class ClipTrack(MediaStreamTrack):
    """A camera that films ``frames`` (RGB arrays, looped) at ``fps``, paced in real time."""

    kind = "video"

    def __init__(self, frames: list[np.ndarray], fps: int = 30, sizes: list[tuple[int, int]] | None = None):
        super().__init__()
        self.frames, self.fps, self.sent = frames, fps, 0
        self.sizes = sizes  # per frame index: scale to this size (a resolution change)
        self._start: float | None = None

    async def recv(self) -> av.VideoFrame:
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self.sent / self.fps
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        vf = av.VideoFrame.from_ndarray(self.frames[self.sent % len(self.frames)], format="rgb24")
        if self.sizes:
            w, h = self.sizes[min(self.sent, len(self.sizes) - 1)]
            if (w, h) != (vf.width, vf.height):
                vf = vf.reformat(width=w, height=h)
        vf.pts, vf.time_base = self.sent * RTP_CLOCK // self.fps, fractions.Fraction(1, RTP_CLOCK)
        self.sent += 1
        return vf


def clip(n: int = 60, size: str = "320x180") -> list[np.ndarray]:
    """``n`` RGB frames of FFmpeg's moving test pattern."""
    with av.open(f"testsrc2=size={size}:rate=30", format="lavfi") as c:
        out = []
        for f in c.decode(video=0):
            out.append(f.to_ndarray(format="rgb24"))
            if len(out) == n:
                return out
    return out


async def offer(pc: RTCPeerConnection, url: str, token: str | None = None) -> tuple[httpx.Response, str | None]:
    """POST ``pc``'s complete offer to ``url``; (the response, the session's absolute URL)."""
    await pc.setLocalDescription(await pc.createOffer())
    headers = {"Content-Type": "application/sdp", **({"Authorization": f"Bearer {token}"} if token else {})}
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(url, content=pc.localDescription.sdp, headers=headers)
    if r.status_code != 201:
        return r, None
    await pc.setRemoteDescription(RTCSessionDescription(r.text, "answer"))
    return r, str(httpx.URL(url).join(r.headers["location"]))


async def publish(base: str, stream_id: str, track: MediaStreamTrack, token: str | None = None):
    """(peer connection, session URL) of a WHIP publish of ``track``; AssertionError if refused."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver(track, direction="sendonly")
    r, location = await offer(pc, f"{base}/whip/{stream_id}", token)
    if location is None:
        await pc.close()
        raise AssertionError(f"publish refused: {r.status_code} {r.text}")
    return pc, location


class Viewer:
    """A WHEP viewer that keeps every frame it receives (yuv420p arrays) with its arrival time."""

    def __init__(self):
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.addTransceiver("video", direction="recvonly")
        self.frames: list[tuple[float, av.VideoFrame]] = []
        self._task: asyncio.Task | None = None
        self.location: str | None = None

        @self.pc.on("track")
        def on_track(track):
            self._task = asyncio.ensure_future(self._read(track))

    async def _read(self, track) -> None:
        try:
            while True:
                vf = await track.recv()
                self.frames.append((time.time(), vf))
        except Exception:
            return

    async def watch(self, base: str, stream_id: str, token: str | None = None) -> httpx.Response:
        r, self.location = await offer(self.pc, f"{base}/whep/{stream_id}", token)
        return r

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        await self.pc.close()


async def delete(location: str, token: str | None = None) -> int:
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.delete(location, headers={"Authorization": f"Bearer {token}"} if token else {})
    return r.status_code
