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
import av
import numpy as np

from services.stack import Stack
from shared import logs
from tools.browser import MEDIA, align, find_chromium, make_y4m, picture_luma, publish_and_watch

SIZE = (640, 360)


def pct(values, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if len(values) else None


def last_hop(frames: list[np.ndarray], size: tuple[int, int], bitrate: int) -> dict:
    """aiortc's VP8 encoder at ``bitrate`` (what the edge runs per viewer): ms per frame, and the
    PSNR-Y of what it sends against its input (the last hop's own loss)."""
    import fractions

    from aiortc.codecs import get_encoder
    from aiortc.codecs.vpx import VpxPayloadDescriptor
    from aiortc.rtcrtpparameters import RTCRtpCodecParameters

    from shared.pixfmt import from_video_frame, to_video_frame
    from shared.quality import psnr

    w, h = size
    enc = get_encoder(RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96))
    enc.target_bitrate = bitrate
    dec = av.CodecContext.create("libvpx", "r")
    spent, sent_bytes, scores = 0.0, 0, []
    for i, f in enumerate(frames[:120]):
        vf = to_video_frame(f, w, h)
        vf.pts, vf.time_base = i * 3000, fractions.Fraction(1, 90000)
        t = time.perf_counter()
        payloads, _ = enc.encode(vf)
        spent += time.perf_counter() - t if i >= 10 else 0.0
        data = b"".join(VpxPayloadDescriptor.parse(p)[1] for p in payloads)
        sent_bytes += len(data)
        for out in dec.decode(av.Packet(data)):
            y = from_video_frame(out)[: w * h]
            scores.append(psnr(y.reshape(h, w), f[: w * h].reshape(h, w)))
    n = min(len(frames), 120)
    return {"bitrate_kbps": bitrate // 1000, "encode_ms_per_frame": round(1000 * spent / (n - 10), 2),
            "sent_kbps": round(8 * sent_bytes / (n / 30) / 1000, 1), "psnr_y": round(float(np.mean(scores[10:])), 2)}


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
    gray = picture_luma(result["screenshot"][y:y + h, x:x + w])
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
        "viewer_received_kbps": viewer["stats"].get("kbps"),
        # the watch page's panel: the API's last rows of the stream, through the edge
        "watch_page_rows": len(viewer.get("rows") or []),
        # aiortc's VP8 starts at 500 kbps and follows the browser's estimate between 250 and 1500
        "last_hop_vp8": [last_hop(source, SIZE, b) for b in (500_000, 1_500_000)],
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
