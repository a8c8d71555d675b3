"""Chained streams end to end on real servers: workers hand each batch's last decoded frame on, the
next batch predicts from it, receivers decode bit for bit, and every key frame has its reason."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from services.ingest import ingest, read_batches
from services.receiver import decode_stream
from shared import bus as busmod
from shared.control import keyframe_subject
from shared.quality import measure_batch
from tests.conftest import compressor, metrics_writer, running, unique, wait_rows
from tests.test_pipeline import read_video

pytestmark = pytest.mark.slow

SOURCE = "lavfi:testsrc2=size=320x240:rate=30"


def reasons(rows) -> list:
    return [r["keyframe_reason"] for r in sorted(rows, key=lambda r: r["batch_seq"])]


def assert_decoded_exactly(rows, decoded: np.ndarray, source: np.ndarray, w: int, h: int) -> None:
    """Each batch's frames as the receiver decoded them give the row's PSNR-Y to the last bit: the
    row was measured on the worker's reconstruction, so a receiver that drifted would differ."""
    for r in rows:
        k = r["batch_seq"] * 8
        q = measure_batch(source[k:k + 8], decoded[k:k + 8], w, h, 0)
        assert q.psnr_y == pytest.approx(r["psnr_y"], abs=1e-9), f"batch {r['batch_seq']}"


async def test_two_workers_at_concurrency_two_chain_a_stream_that_decodes_exactly(
    bus, bus_cfg, postgres, tmp_path
):
    sid = unique("chain")
    workers = [compressor(bus_cfg, codec="x264-psnr", concurrency=2, keyframe_every_s=0) for _ in range(2)]
    async with running(*workers, metrics_writer(bus_cfg, postgres.url)):
        stats = await ingest(bus, SOURCE, sid, 8, 128, progress=False)
        rows = await wait_rows(postgres.url, [sid], 16)
        out = tmp_path / "out.y4m"
        got = await decode_stream(bus, sid, out, idle_timeout=2, expect_batches=16)
    assert stats.batches == 16 and len(rows) == 16 and all(r["status"] == "ok" for r in rows)
    assert {r["worker_id"] for r in rows} == {w.cfg.worker_id for w in workers}  # both took part
    kf = reasons(rows)
    assert kf[0] == "first" and kf[1:].count(None) >= 13, kf  # chained, but for a rare timeout
    assert all("ref=" in r["codec_params"] for r in rows if r["keyframe_reason"] is None)
    # A file published at full speed is no live stream: no deadline, the fewest-bytes preset.
    assert all("preset=medium" in r["codec_params"] for r in rows)
    assert got.undecodable == [] and got.frames == 128
    source = np.concatenate([b.frames for b in read_batches(SOURCE, "ref", 8, 128)])
    assert_decoded_exactly(rows, np.stack(read_video(out)), source, 320, 240)


async def test_every_key_frame_of_a_chained_stream_says_why(bus, bus_cfg, postgres, tmp_path):
    sid = unique("why")
    worker = compressor(bus_cfg, codec="x264-psnr", chain_wait_s=0.5, keyframe_every_s=0)
    async with running(worker, metrics_writer(bus_cfg, postgres.url)):
        await asyncio.sleep(0.5)  # the worker is subscribed to key-frame requests
        # A receiver asked for a key frame from batch 2 on.
        await bus.nc.publish(keyframe_subject(sid), json.dumps({"from_batch": 2}).encode())
        await bus.nc.flush()
        await asyncio.sleep(0.3)
        await ingest(bus, SOURCE, sid, 8, 32, progress=False)  # batches 0-3
        await wait_rows(postgres.url, [sid], 4)
    # The stream's reference disappears from the bus (what its 10-minute expiry does to an idle
    # stream), and a worker that never saw the stream takes over.
    await bus.js.purge_stream(busmod.REFS_STREAM)  # (this test's server: only this stream's)
    worker = compressor(bus_cfg, codec="x264-psnr", chain_wait_s=0.5, keyframe_every_s=0)
    async with running(worker, metrics_writer(bus_cfg, postgres.url)):
        await ingest(bus, SOURCE, sid, 8, 16, progress=False)  # batches 4-5
        await wait_rows(postgres.url, [sid], 6)
        await ingest(bus, "lavfi:testsrc2=size=160x120:rate=30", sid, 8, 16, progress=False)  # 6-7, new size
        rows = await wait_rows(postgres.url, [sid], 8)
        got = await decode_stream(bus, sid, tmp_path / "out.y4m", idle_timeout=2, expect_batches=8)
    assert reasons(rows) == ["first", None, "requested", None, "no_reference", None, "resolution", None]
    assert got.undecodable == [] and got.frames == 64 and len(got.files) == 2


async def test_periodic_key_frames_come_as_configured(bus, bus_cfg, postgres):
    sid = unique("periodic")
    # 8 frames at 30 fps: a key frame every 1.07 s is one every 4 batches.
    worker = compressor(bus_cfg, codec="x264-psnr", keyframe_every_s=32 / 30)
    async with running(worker, metrics_writer(bus_cfg, postgres.url)):
        await ingest(bus, SOURCE, sid, 8, 80, progress=False)
        rows = await wait_rows(postgres.url, [sid], 10)
    assert reasons(rows) == ["first", None, None, None, "periodic", None, None, None, "periodic", None]


async def test_a_batch_after_one_coded_without_a_hand_off_starts_with_a_key_frame_at_once(bus, bus_cfg, postgres):
    sid = unique("mixed")
    closed = compressor(bus_cfg, codec="x264", chain=False)
    async with running(closed, metrics_writer(bus_cfg, postgres.url)):
        await ingest(bus, SOURCE, sid, 8, 16, progress=False)
        await wait_rows(postgres.url, [sid], 2)
    chained = compressor(bus_cfg, codec="x264", chain_wait_s=30)
    async with running(chained, metrics_writer(bus_cfg, postgres.url)):
        await ingest(bus, SOURCE, sid, 8, 16, progress=False)
        rows = await wait_rows(postgres.url, [sid], 4)
    assert reasons(rows) == [None, None, "codec_change", None]
    assert rows[2]["latency_ms"] < 10_000  # it did not wait out the 30 s for a reference


async def test_a_receiver_joining_mid_stream_asks_for_a_key_frame_and_decodes_from_it(
    bus, bus_cfg, postgres, tmp_path
):
    sid = unique("join")
    worker = compressor(bus_cfg, codec="x264-psnr", keyframe_every_s=0)
    async with running(worker, metrics_writer(bus_cfg, postgres.url)):
        feed = asyncio.create_task(ingest(bus, SOURCE, sid, 8, 240, realtime=True, progress=False))  # 30 batches, 8 s
        await wait_rows(postgres.url, [sid], 6)
        # Joins at batch 6, whose reference (batch 5's last frame) it never saw.
        got = await decode_stream(bus, sid, tmp_path / "late.y4m", idle_timeout=3, start_seq=6)
        await feed
        rows = await wait_rows(postgres.url, [sid], 30)
    assert got.keyframe_requests >= 1 and got.undecodable and got.undecodable[0] == 6
    requested = [r["batch_seq"] for r in rows if r["keyframe_reason"] == "requested"]
    assert requested, reasons(rows)
    # The key frame came within a batch or two of the request (what was in flight was already coded).
    assert requested[0] - got.undecodable[0] <= 3
    assert got.undecodable == list(range(6, requested[0]))
    assert got.frames == 8 * (30 - requested[0])


async def test_kill_9_of_one_of_two_workers_mid_stream_loses_nothing_and_the_stream_decodes_to_the_end(
    bus, bus_cfg, nats_server, postgres, tmp_path
):
    sid = unique("kill")
    env = {**os.environ, **nats_server.env("compressor"), "AIC_ACK_WAIT_S": "5", "AIC_CODEC": "x264-psnr"}

    def start_worker():
        return subprocess.Popen([sys.executable, "-m", "services.compressor", "--concurrency", "2"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    source = "lavfi:testsrc2=size=640x360:rate=30"
    async with running(metrics_writer(bus_cfg, postgres.url)):
        victim, survivor = start_worker(), start_worker()
        try:
            feed = asyncio.create_task(ingest(bus, source, sid, 8, 200, realtime=True, progress=False))
            await wait_rows(postgres.url, [sid], 6)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            stats = await feed
            await wait_rows(postgres.url, [sid], stats.batches, timeout=180)
            await asyncio.sleep(6)  # past one more ack wait: a late redelivery would have made a second row
            rows = await wait_rows(postgres.url, [sid], 0)
            out = tmp_path / "out.y4m"
            got = await decode_stream(bus, sid, out, idle_timeout=2, expect_batches=stats.batches)
        finally:
            for p in (victim, survivor):
                if p.poll() is None:
                    p.terminate()
                    p.wait(30)
    assert stats.batches == 25
    assert sorted(r["batch_seq"] for r in rows) == list(range(25)) and all(r["status"] == "ok" for r in rows)
    # A batch the victim held is coded again after the ack wait, ~5 s later: a receiver reading the
    # stream in order has moved past it by then (its reorder window is 16 batches) and skips it; the
    # batches after it started with a key frame (timeout), so nothing else is lost.
    late = {r["batch_seq"] for r in rows if r["attempts"] > 1}
    assert got.undecodable == [] and set(got.gaps) <= late and got.frames == 8 * (25 - len(got.gaps))
    frames = np.concatenate([b.frames for b in read_batches(source, "ref", 8, 200)])
    decoded = np.stack(read_video(out))
    kept = [r for r in sorted(rows, key=lambda r: r["batch_seq"]) if r["batch_seq"] not in got.gaps]
    for i, r in enumerate(kept):  # the decoded file holds the kept batches back to back
        q = measure_batch(frames[8 * r["batch_seq"]:8 * r["batch_seq"] + 8], decoded[8 * i:8 * i + 8], 640, 360, 0)
        assert q.psnr_y == pytest.approx(r["psnr_y"], abs=1e-9), f"batch {r['batch_seq']}"


async def test_a_hand_off_the_bus_refuses_costs_a_key_frame_never_the_batch(bus, bus_cfg, postgres, monkeypatch):
    from services.compressor.handoff import ReferenceStore

    async def refused(self, *a, **kw):
        raise TimeoutError("nats: timeout")

    monkeypatch.setattr(ReferenceStore, "publish", refused)
    sid = unique("refused")
    async with running(compressor(bus_cfg, codec="x264-psnr", chain_wait_s=0.3), metrics_writer(bus_cfg, postgres.url)):
        await ingest(bus, SOURCE, sid, 8, 24, progress=False)
        rows = await wait_rows(postgres.url, [sid], 3)
        await asyncio.sleep(1)
        rows = await wait_rows(postgres.url, [sid], 3)
    assert len(rows) == 3 and all(r["status"] == "ok" and r["attempts"] == 1 for r in rows)


@pytest.mark.parametrize("target,codec", [(30.0, "hybrid"), (99.0, "x264-psnr")], ids=["hybrid", "native-fallback"])
async def test_the_hybrid_chains_on_its_base_and_its_native_fallbacks_chain_too(
    bus, bus_cfg, postgres, tmp_path, tiny_model, target, codec
):
    pytest.importorskip("torch")
    from shared.config import PolicyConfig

    sid = unique("hybrid")
    # A target the (untrained) restoration meets, or one nothing meets: then native goes out, chained
    # like the hybrid's own batches, so the stream is one chain whichever codec a batch took.
    worker = compressor(bus_cfg, codec="hybrid", model="tiny-restore", keyframe_every_s=0,
                        policy=PolicyConfig(target=target, compare_every=0))
    async with running(worker, metrics_writer(bus_cfg, postgres.url)):
        await ingest(bus, SOURCE, sid, 8, 48, progress=False)
        rows = await wait_rows(postgres.url, [sid], 6)
        out = tmp_path / "out.y4m"
        got = await decode_stream(bus, sid, out, idle_timeout=2, expect_batches=6)
    assert worker.chained and reasons(rows) == ["first"] + [None] * 5
    assert {r["codec"] for r in rows} == {codec}
    assert all("ref=" in r["codec_params"] for r in rows[1:])
    assert got.undecodable == [] and got.frames == 48
    source = np.concatenate([b.frames for b in read_batches(SOURCE, "ref", 8, 48)])
    assert_decoded_exactly(rows, np.stack(read_video(out)), source, 320, 240)


async def test_one_key_frame_request_gets_one_key_frame_from_two_workers(bus, bus_cfg, postgres):
    sid = unique("once")
    workers = [compressor(bus_cfg, codec="x264-psnr", keyframe_every_s=0) for _ in range(2)]
    async with running(*workers, metrics_writer(bus_cfg, postgres.url)):
        await asyncio.sleep(0.5)  # both workers are subscribed to key-frame requests
        await bus.nc.publish(keyframe_subject(sid), json.dumps({"from_batch": 3}).encode())
        await bus.nc.flush()
        await asyncio.sleep(0.3)
        await ingest(bus, SOURCE, sid, 8, 80, progress=False)
        rows = await wait_rows(postgres.url, [sid], 10)
    kf = reasons(rows)
    assert kf.count("requested") == 1 and kf.index("requested") >= 3, kf
    assert {r["worker_id"] for r in rows} == {w.cfg.worker_id for w in workers}  # both took part
