"""Glass-to-row and glass-to-viewer latency through the WebRTC edge, with real browsers.

Starts the stack as ``aic up`` does (embedded NATS and PostgreSQL, a compressor, the metrics
service, the edge, each its own process), makes an operator and a viewer token, and has headless
Chromium publish a camera (a .y4m clip made from ../shared/media) over WHIP for ``--seconds`` while
a second Chromium watches over WHEP (tools/browser.py).  Prints, p50 and p99:

- glass-to-row: a frame's capture in the browser (its RTCP clock) to its batch's metrics row
  (``inserted_at``); for the batch's last frame, and for its first (which waits for the batch);
- glass-to-viewer: the capture to the moment the viewer page shows the frame
  (``requestVideoFrameCallback``'s expected display time, matched by RTP timestamp);
- the parts: browser to edge (the capture lag), and the last hop's cost: one VP8 encode per viewer
  (ms per frame at the clip's size, timed here) and its loss (PSNR-Y of the viewer's picture).

    python -m benchmarks.webrtc_latency [--seconds 30] [--clip camera_576p.mp4] [--batch-frames 8] [--json OUT]

Every figure is measured in this run on this machine; it says which machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import timedelta
from pathlib import Path

import asyncpg
import numpy as np

from services.stack import Stack
from shared import logs
from tools.browser import MEDIA, align, find_chromium, make_y4m, publish_and_watch

SIZE = (640, 360)


def pct(values, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if len(values) else None


def vp8_encode_ms(frames: list[np.ndarray], size: tuple[int, int]) -> float:
    """aiortc's VP8 encoder, ms per frame at ``size`` (the edge's cost per viewer)."""
    import fractions

    from aiortc.codecs import get_encoder
    from aiortc.rtcrtpparameters import RTCRtpCodecParameters

    from shared.pixfmt import to_video_frame

    enc = get_encoder(RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96))
    vfs = [to_video_frame(f, *size) for f in frames[:90]]
    for i, vf in enumerate(vfs[:10]):  # warm-up
        vf.pts, vf.time_base = i * 3000, fractions.Fraction(1, 90000)
        enc.encode(vf)
    t = time.perf_counter()
    for i, vf in enumerate(vfs):
        vf.pts, vf.time_base = (i + 10) * 3000, fractions.Fraction(1, 90000)
        enc.encode(vf)
    return 1000 * (time.perf_counter() - t) / len(vfs)


async def tokens(url: str) -> tuple[str, str]:
    from services.metrics.auth import create_token

    conn = await asyncpg.connect(url)
    try:
        _, op = await create_token(conn, "operator", expires_in=timedelta(hours=2), name="bench-publisher")
        _, viewer = await create_token(conn, "viewer", expires_in=timedelta(hours=2), name="bench-viewer")
    finally:
        await conn.close()
    return op, viewer


async def rows(url: str, sid: str, timeout: float = 60.0) -> list:
    deadline, got, settled = time.monotonic() + timeout, [], 0
    conn = await asyncpg.connect(url)
    try:
        while time.monotonic() < deadline and settled < 3:
            now = await conn.fetch("SELECT batch_seq, frames, status, captured_at, inserted_at, psnr_y, kbps, codec "
                                   "FROM batch_metrics WHERE stream_id = $1 ORDER BY batch_seq", sid)
            settled = settled + 1 if now and len(now) == len(got) else 0
            got = now
            await asyncio.sleep(1)
    finally:
        await conn.close()
    return got


async def run(seconds: float, clip: Path) -> dict:
    binary, why = find_chromium()
    if binary is None:
        raise SystemExit(f"webrtc_latency: {why}")
    with tempfile.TemporaryDirectory(prefix="aic-webrtc-") as tmp:
        camera = Path(tmp) / "camera.y4m"
        source = make_y4m(camera, clip, size=SIZE)
        with Stack(Path(tmp) / "aic", edge=True) as stack:
            op, viewer_token = await tokens(stack.database_url)
            base = stack.edge_url
            deadline = time.monotonic() + 30
            while True:  # the edge answers once its process is up
                try:
                    await asyncio.to_thread(urllib.request.urlopen, base + "/healthz", timeout=2)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.3)
            sid = f"webrtc-{uuid.uuid4().hex[:6]}"
            result = await publish_and_watch(binary, base, sid, camera, seconds=seconds, token=op,
                                             viewer_token=viewer_token)
            got = await rows(stack.database_url, sid)
            edge_log = (stack.data_dir / "logs" / "edge.log").read_text()
    ended = [json.loads(line) for line in edge_log.splitlines() if '"whip_session_ended"' in line]
    lag = ended[-1].get("capture_lag_ms_p50") if ended else None
    ok = [r for r in got if r["status"] == "ok"]
    last = [1000 * (r["inserted_at"] - r["captured_at"]).total_seconds() for r in ok]
    first = [v + 1000 * (r["frames"] - 1) / 30 for v, r in zip(last, ok)]  # (the browser films at 30 fps)
    viewer = result["viewer"]
    g2v = viewer["latencies"][30:]  # (after the first second: the viewer's join and key frame)
    x, y, w, h = (int(round(v)) for v in result["video_box"])
    gray = (result["screenshot"][y:y + h, x:x + w] @ np.array([0.299, 0.587, 0.114]) * 219 / 255 + 16).astype(np.uint8)
    (_, shot_psnr), = align([gray], SIZE, source)
    seqs = [r["batch_seq"] for r in got]
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores ({platform.node()})",
        "clip": clip.name if clip.exists() else "lavfi testsrc2 (no ../shared/media)",
        "size": f"{SIZE[0]}x{SIZE[1]}", "seconds": round(result["published_s"], 1),
        "batches": len(got), "rows_one_each": seqs == list(range(len(seqs))),
        "frames_sent_by_browser": result["publisher"]["stats"].get("framesSent"),
        "frames_in_rows": sum(r["frames"] for r in got),
        "codec": ok[-1]["codec"] if ok else None,
        "kbps_mean": round(float(np.mean([r["kbps"] for r in ok])), 1) if ok else None,
        "psnr_y_delivered_mean": round(float(np.mean([r["psnr_y"] for r in ok if r["psnr_y"]])), 2) if ok else None,
        "glass_to_row_last_frame_ms": {"p50": pct(last, 50), "p99": pct(last, 99)},
        "glass_to_row_first_frame_ms": {"p50": pct(first, 50), "p99": pct(first, 99)},
        "glass_to_viewer_ms": {"p50": pct(g2v, 50), "p99": pct(g2v, 99), "frames": len(g2v)},
        "browser_to_edge_ms_p50": lag,
        "viewer_frames_decoded": viewer["stats"].get("framesDecoded"),
        "viewer_longest_gap_ms": round(viewer["maxGapMs"], 1),
        "viewer_screenshot_psnr_y": round(shot_psnr, 2),
        "last_hop_vp8_encode_ms_per_frame": round(vp8_encode_ms(source, SIZE), 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=30.0, help="how long the browser publishes (default %(default)s)")
    p.add_argument("--clip", default="camera_576p.mp4", help="a clip of ../shared/media, or a path (default %(default)s)")
    p.add_argument("--batch-frames", type=int, default=8,
                   help="frames per batch at the edge (default %(default)s): the batch waits for its last frame")
    p.add_argument("--json", type=Path, help="also write the figures here")
    a = p.parse_args(argv)
    os.environ["AIC_BATCH_FRAMES"] = str(a.batch_frames)  # (the edge process reads it)
    logs.configure(level="warning")
    clip = Path(a.clip) if "/" in a.clip else MEDIA / a.clip
    out = asyncio.run(run(a.seconds, clip))
    out["date"], out["batch_frames"] = time.strftime("%Y-%m-%d"), a.batch_frames
    print(json.dumps(out, indent=1))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0 if out["rows_one_each"] else 1


if __name__ == "__main__":
    sys.exit(main())
