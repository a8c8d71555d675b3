"""A real headless Chromium, driven over the DevTools protocol, for the edge's browser test and its
latency benchmark: a fake camera from a .y4m clip, pages opened, JavaScript evaluated, screenshots.

Chromium comes from Debian's package (``apt-get install chromium``); :func:`find_chromium` installs
it where it may (root with apt) and otherwise says why it cannot."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import av
import numpy as np

from shared.pixfmt import from_video_frame, split_planes

#: Chromium's flags for WebRTC on one machine without a screen, a camera or a person to click "allow".
FLAGS = ["--headless=new", "--allow-loopback-in-peer-connection", "--use-fake-device-for-media-stream",
         "--use-fake-ui-for-media-stream", "--autoplay-policy=no-user-gesture-required", "--disable-gpu",
         "--no-first-run", "--no-default-browser-check", "--disable-background-timer-throttling",
         "--disable-renderer-backgrounding", "--disable-backgrounding-occluded-windows", "--mute-audio",
         "--window-size=1280,800"]
MEDIA = Path(os.environ.get("AIC_MEDIA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "media")


def find_chromium(install: bool = True) -> tuple[str | None, str]:
    """(path of chromium, "") or (None, why there is none).  Installs Debian's package when missing,
    if this process is root and has apt-get."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path, ""
    if not install:
        return None, "chromium is not installed"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "chromium is not installed, and installing it needs root and apt-get (apt-get install chromium)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "install", "-y", "--no-install-recommends", "chromium"], ["apt-get", "update"],
                ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if cmd[1] == "install" and done.returncode == 0 and shutil.which("chromium"):
            return shutil.which("chromium"), ""
    return None, f"apt-get install chromium failed: {done.stderr.strip()[-300:]}"


def make_y4m(path: Path, source: Path | None = None, frames: int = 255, size: tuple[int, int] = (640, 360),
             fps: int = 30) -> list[np.ndarray]:
    """Write ``frames`` frames of ``source`` (a lavfi test pattern when None or missing) scaled to
    ``size`` as a .y4m Chromium's fake camera plays in a loop; returns them (packed yuv420p)."""
    w, h = size
    if source is not None and source.exists():
        container = av.open(str(source))
    else:
        container = av.open(f"testsrc2=size={w}x{h}:rate={fps}", format="lavfi")
    out = []
    with container, open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for vf in container.decode(video=0):
            packed = from_video_frame(vf.reformat(width=w, height=h, format="yuv420p"))
            f.write(b"FRAME\n" + packed.tobytes())
            out.append(packed)
            if len(out) == frames:
                break
    return out


class Page:
    """One tab, over its DevTools websocket."""

    def __init__(self, ws):
        self.ws, self._ids = ws, itertools.count(1)

    async def call(self, method: str, **params) -> dict:
        i = next(self._ids)
        await self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(await self.ws.recv())
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def eval(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited)."""
        r = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails'].get('text')} "
                               f"{r['exceptionDetails'].get('exception', {}).get('description', '')}")
        return r["result"].get("value")

    async def wait(self, expression: str, timeout: float, what: str = ""):
        deadline = time.monotonic() + timeout
        while True:
            value = await self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                state = await self.eval("JSON.stringify({state: window.aic && aic.state, error: window.aic && aic.error})")
                raise TimeoutError(f"{what or expression} not within {timeout:g} s (page: {state})")
            await asyncio.sleep(0.25)

    async def screenshot(self) -> np.ndarray:
        """The page as an RGB array."""
        import base64

        png = base64.b64decode((await self.call("Page.captureScreenshot", format="png"))["data"])
        with av.open(io.BytesIO(png), format="png_pipe") as c:
            return next(c.decode(video=0)).to_ndarray(format="rgb24")


class Chromium:
    """A headless Chromium process (its own profile), with a fake camera playing ``camera`` (.y4m)."""

    def __init__(self, binary: str, camera: Path | None = None):
        self.binary, self.camera = binary, camera
        self.profile = Path(tempfile.mkdtemp(prefix="aic-chromium-"))
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self._sockets = []

    async def __aenter__(self) -> "Chromium":
        flags = [*FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0"]
        if self.camera is not None:
            flags.append(f"--use-file-for-fake-video-capture={self.camera}")
        if os.geteuid() == 0:
            flags.append("--no-sandbox")  # (Chromium refuses to run as root with its sandbox)
        self.proc = subprocess.Popen([self.binary, *flags, "about:blank"], stdout=subprocess.DEVNULL,
                                     stderr=open(self.profile / "stderr.log", "wb"), start_new_session=True)
        deadline = time.monotonic() + 30
        port_file = self.profile / "DevToolsActivePort"
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start: {(self.profile / 'stderr.log').read_text()[-500:]}")
            await asyncio.sleep(0.1)
        self.port = int(port_file.read_text().split()[0])
        return self

    async def open(self, url: str) -> Page:
        import websockets

        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/json/new?about:blank", method="PUT")
        target = json.loads(await asyncio.to_thread(lambda: urllib.request.urlopen(req, timeout=10).read()))
        ws = await websockets.connect(target["webSocketDebuggerUrl"], max_size=None)
        self._sockets.append(ws)
        page = Page(ws)
        await page.call("Page.navigate", url=url)  # (json/new's own URL loses the query's second parameter)
        await page.wait("document.readyState === 'complete' && !!window.aic", 20, "the page to load")
        return page

    async def __aexit__(self, *exc) -> None:
        for ws in self._sockets:
            await ws.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


def luma(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """The Y plane of a packed yuv420p frame."""
    return split_planes(frame, width, height)[0]


def picture_luma(rgb: np.ndarray) -> np.ndarray:
    """The Y plane of an RGB picture (a screenshot), as the gateway would convert it (swscale)."""
    h, w = rgb.shape[0] & ~1, rgb.shape[1] & ~1
    vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[:h, :w]), format="rgb24")
    return luma(from_video_frame(vf), w, h)


def align(received: list[np.ndarray], size: tuple[int, int], source: list[np.ndarray]) -> list[tuple[int, float]]:
    """For each received luma plane (any size), the source frame it shows (the best match among
    ``source``, at ``size``) and its PSNR-Y against it."""
    from shared.quality import psnr

    w, h = size
    small = lambda y: y.reshape(y.shape[0] // 8, 8, y.shape[1] // 8, 8).mean(axis=(1, 3))  # noqa: E731
    src_y = [luma(f, w, h).astype(np.float32) for f in source]
    src_small = np.stack([small(y) for y in src_y])
    out = []
    for y in received:
        if y.shape != (h, w):
            y = av.VideoFrame.from_ndarray(np.ascontiguousarray(y), format="gray").reformat(width=w, height=h).to_ndarray()
        best = int(np.argmin(((src_small - small(y.astype(np.float32))) ** 2).mean(axis=(1, 2))))
        out.append((best, psnr(y, src_y[best].astype(np.uint8))))
    return out


async def publish_and_watch(binary: str, base: str, stream_id: str, camera: Path, seconds: float = 20.0,
                            watch_after_s: float = 4.0, token: str | None = None,
                            viewer_token: str | None = None) -> dict:
    """The publish page sends ``camera`` to ``stream_id`` for ``seconds``; a second Chromium watches it
    from ``watch_after_s`` on.  Returns both pages' state (window.aic), and the viewer's screenshot
    and the video's box in it."""
    fragment = f"#token={token}" if token else ""
    view_fragment = f"#token={viewer_token or token}" if (viewer_token or token) else ""
    async with Chromium(binary, camera) as pub_browser, Chromium(binary) as view_browser:
        pub = await pub_browser.open(f"{base}/publish?stream={stream_id}&autostart=1{fragment}")
        await pub.wait("aic.state === 'publishing' || aic.state === 'error'", 30, "the publish to start")
        if await pub.eval("aic.state") == "error":
            raise AssertionError(f"publish failed: {await pub.eval('aic.error')}")
        started = time.monotonic()
        await asyncio.sleep(watch_after_s)
        view = await view_browser.open(f"{base}/watch?stream={stream_id}&autostart=1{view_fragment}")
        await view.wait("aic.state === 'watching' || aic.state === 'error'", 30, "the viewer to start")
        await view.wait("aic.frames > 30 || aic.state === 'error'", 30, "frames at the viewer")
        await asyncio.sleep(max(0.0, seconds - (time.monotonic() - started)))
        shot = await view.screenshot()
        box = await view.eval("(() => { const r = document.getElementById('video').getBoundingClientRect(); "
                              "return [r.x, r.y, r.width, r.height]; })()")
        viewer = await view.eval("JSON.parse(JSON.stringify(aic))")
        await view.eval("stop()")
        publisher = await pub.eval("JSON.parse(JSON.stringify(aic))")
        await pub.eval("stop()")
        return {"publisher": publisher, "viewer": viewer, "screenshot": shot, "video_box": box,
                "published_s": time.monotonic() - started}


async def publish_for(binary: str, base: str, stream_id: str, camera: Path, seconds: float,
                      token: str | None = None) -> dict:
    """The publish page sends ``camera`` to ``stream_id`` for ``seconds``, then stops; its window.aic."""
    fragment = f"#token={token}" if token else ""
    async with Chromium(binary, camera) as browser:
        page = await browser.open(f"{base}/publish?stream={stream_id}&autostart=1{fragment}")
        await page.wait("aic.state === 'publishing' || aic.state === 'error'", 30, "the publish to start")
        await asyncio.sleep(seconds)
        state = await page.eval("JSON.parse(JSON.stringify(aic))")
        await page.eval("stop()")
        return state
