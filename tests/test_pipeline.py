"""End to end on real servers (embedded NATS and PostgreSQL on free ports)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import av
import msgpack
import numpy as np
import pytest

from services.ingest import ingest, read_batches
from shared import bus as busmod
from services.compressor.policy import Policy
from services.compressor.worker import EXIT_WEDGED
from shared.codecs import NativeCodec
from shared.config import PolicyConfig
from shared.pixfmt import from_video_frame, frame_size, split_planes
from shared.quality import psnr
from shared.schemas import FrameBatch
from tests.conftest import compressor, metrics_writer, running, unique, wait_rows

pytestmark = pytest.mark.slow

SOURCE = "lavfi:testsrc2=size=320x240:rate=30"


def read_video(path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [from_video_frame(f) for f in c.decode(video=0)]


async def test_two_streams_make_sixteen_rows_and_decode_to_what_the_rows_say(
    bus, bus_cfg, nats_server, postgres, tmp_path
):
    streams = [unique("e2e"), unique("e2e")]
    async with running(compressor(bus_cfg, quality_frames=-1), metrics_writer(bus_cfg, postgres.url)):
        stats = await asyncio.gather(*(ingest(bus, SOURCE, s, 8, 64, progress=False) for s in streams))
        rows = await wait_rows(postgres.url, streams, 16)
    assert [s.batches for s in stats] == [8, 8]
    assert len(rows) == 16
    assert all(r["status"] == "ok" and r["frames"] == 8 for r in rows)
    assert all(r["ms_ssim_frames"] == 8 and 0.9 < r["ms_ssim"] <= 1 for r in rows)

    source = np.concatenate([b.frames for b in read_batches(SOURCE, "ref", 8, 64)])
    for sid in streams:
        out = tmp_path / f"{sid}.y4m"
        # The receiver as a user runs it: the CLI, in its own process.
        proc = subprocess.run(
            [sys.executable, "-m", "services.cli", "decode", "--stream-id", sid, "--out", str(out),
             "--nats-url", nats_server.url, "--idle-timeout", "2"],
            capture_output=True, text=True, timeout=120, env={**os.environ, **nats_server.env("receiver")},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        decoded = read_video(out)
        assert len(decoded) == 64
        for r in (r for r in rows if r["stream_id"] == sid):
            k = r["batch_seq"] * 8
            ys = [
                psnr(split_planes(source[i], 320, 240)[0], split_planes(decoded[i], 320, 240)[0])
                for i in range(k, k + 8)
            ]
            assert abs(np.mean(ys) - r["psnr_y"]) <= 0.05
            assert r["compressed_bytes"] > 0 and r["raw_bytes"] == 8 * frame_size(320, 240)


async def test_bad_input_gives_rejected_rows_and_the_worker_keeps_serving(bus, bus_cfg, postgres):
    sid = unique("bad")
    good = next(read_batches(SOURCE, sid, 8, 8))
    obj = msgpack.unpackb(good.pack(), raw=False)

    def variant(seq, **changes):
        d = {**obj, "batch_seq": seq, **changes}
        return msgpack.packb(d, use_bin_type=True)

    short_frame = list(obj["frames"])
    short_frame[3] = short_frame[3][:-1]
    cases = {
        "not_msgpack": b"\x00\xffthis is not msgpack",
        "unknown_version": variant(1, v=7),
        "bad_frame_size": variant(2, frames=short_frame),
        "negative": variant(3, width=-320),
        "absurd": variant(4, width=1 << 20, height=1 << 20),
        "truncated": variant(5, frame_count=8, frames=obj["frames"][:7]),
        "cut_message": good.pack()[: len(good.pack()) // 2],
    }
    async with running(compressor(bus_cfg), metrics_writer(bus_cfg, postgres.url)):
        for i, data in enumerate(cases.values()):
            await bus.js.publish(busmod.frames_subject(sid), data, headers={"Nats-Msg-Id": f"bad-{i}"})
        ok = FrameBatch(**{**good.__dict__, "batch_seq": 100})
        await bus.publish(busmod.frames_subject(sid), ok.pack(), ok.msg_id)
        rows = await wait_rows(postgres.url, [sid], len(cases) + 1)
    by_status = {}
    for r in rows:
        by_status.setdefault(r["status"], []).append(r)
    assert len(by_status["rejected"]) == len(cases)
    assert [r["batch_seq"] for r in by_status["ok"]] == [100]
    reasons = " ".join(r["reason"] for r in by_status["rejected"])
    for code in ("not_msgpack", "unknown_version", "bad_frame_size", "bad_field", "too_large", "truncated"):
        assert code in reasons
    dead = await bus.js.stream_info(busmod.DEADLETTER_STREAM)
    assert dead.state.messages == len(cases)


class ExplodingCodec(NativeCodec):
    def encode(self, *a, **kw):
        raise RuntimeError("model crashed")


async def test_a_batch_that_fails_max_deliver_times_gets_a_failed_row(bus, bus_cfg, postgres):
    sid = unique("fail")
    worker = compressor(bus_cfg)
    worker.policy = Policy(None, ExplodingCodec("x264"), PolicyConfig())
    fb = next(read_batches(SOURCE, sid, 4, 4))
    async with running(worker, metrics_writer(bus_cfg, postgres.url)):
        await bus.publish(busmod.frames_subject(sid), fb.pack(), fb.msg_id)
        rows = await wait_rows(postgres.url, [sid], 1, timeout=60)
    assert rows[0]["status"] == "failed"
    assert "model crashed" in rows[0]["reason"]
    assert rows[0]["attempts"] == bus_cfg.max_deliver


class HangingCodec(NativeCodec):
    def encode(self, *a, **kw):
        import time

        time.sleep(3.0)  # longer than the batch timeout: a hung model
        raise RuntimeError("woke up too late")


async def test_a_worker_whose_codec_hangs_gives_the_batch_back_and_exits_for_a_fresh_process(bus, bus_cfg, postgres):
    # The stuck thread cannot be stopped and would time out every batch queued behind it, so the
    # worker exits (its supervisor restarts it); each fresh worker retries, the last one fails it.
    sid = unique("hang")
    fb = next(read_batches(SOURCE, sid, 4, 4))
    await bus.publish(busmod.frames_subject(sid), fb.pack(), fb.msg_id)
    codes = []
    async with running(metrics_writer(bus_cfg, postgres.url)):
        for _ in range(bus_cfg.max_deliver):
            worker = compressor(bus_cfg, batch_timeout_s=0.5, concurrency=3)
            worker.policy = Policy(None, HangingCodec("x264"), PolicyConfig())
            codes.append(await asyncio.wait_for(worker.run(asyncio.Event()), timeout=60))
        rows = await wait_rows(postgres.url, [sid], 1, timeout=60)
    assert codes == [EXIT_WEDGED] * bus_cfg.max_deliver
    assert rows[0]["status"] == "failed" and "batch timeout" in rows[0]["reason"]
    assert rows[0]["attempts"] == bus_cfg.max_deliver


async def test_a_batch_whose_worker_dies_on_every_attempt_gets_a_failed_row(nats_server, postgres):
    from shared.bus import Bus

    cfg = nats_server.client("admin", ack_wait_s=1.0, max_deliver=2)
    bus = await Bus.connect(cfg, name="test-crash")
    await bus.ensure_topology()
    sid = unique("crash")
    fb = next(read_batches(SOURCE, sid, 4, 4))
    try:
        await bus.publish(busmod.frames_subject(sid), fb.pack(), fb.msg_id)
        # A worker that takes the batch and dies before answering, twice (= max_deliver).
        crashing = await bus.pull(busmod.FRAMES_STREAM, busmod.COMPRESSOR_CONSUMER)
        for _ in range(2):
            assert len(await crashing.fetch(1, timeout=5)) == 1
        await crashing.unsubscribe()
        async with running(compressor(cfg), metrics_writer(cfg, postgres.url)):
            rows = await wait_rows(postgres.url, [sid], 1, timeout=60)
        info = await bus.js.stream_info(busmod.FRAMES_STREAM)
        dead = await bus.js.stream_info(busmod.DEADLETTER_STREAM)
    finally:
        await bus.close()
    assert rows[0]["status"] == "failed" and rows[0]["batch_seq"] == 0
    assert "no worker answered in 2 deliveries" in rows[0]["reason"]
    assert info.state.messages == 0  # the exhausted batch left the work queue
    assert dead.state.messages == 1


async def test_a_4k_batch_goes_through_by_claim_check(bus, bus_cfg, postgres):
    sid = unique("uhd")
    async with running(compressor(bus_cfg, concurrency=1), metrics_writer(bus_cfg, postgres.url)):
        await ingest(bus, "lavfi:testsrc2=size=3840x2160:rate=30", sid, 8, 8, progress=False)
        rows = await wait_rows(postgres.url, [sid], 1, timeout=180)
    assert rows[0]["status"] == "ok", rows[0]["reason"]
    assert (rows[0]["width"], rows[0]["height"], rows[0]["frames"]) == (3840, 2160, 8)
    assert rows[0]["raw_bytes"] > bus.nc.max_payload  # it could only have travelled by claim check


async def test_kill_9_of_the_compressor_mid_run_loses_and_duplicates_nothing(
    bus, bus_cfg, nats_server, postgres, tmp_path
):
    sid = unique("kill")
    env = {**os.environ, **nats_server.env("compressor"), "AIC_ACK_WAIT_S": "5", "AIC_CODEC": "x264"}

    def start_worker():
        return subprocess.Popen(
            [sys.executable, "-m", "services.compressor", "--concurrency", "2"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    async with running(metrics_writer(bus_cfg, postgres.url)):
        first = start_worker()
        try:
            # Paced at the source rate (6.7 s), so the kill lands mid-run however fast the worker codes.
            feed = asyncio.create_task(
                ingest(bus, "lavfi:testsrc2=size=640x360:rate=30", sid, 8, 200, realtime=True, progress=False))
            await wait_rows(postgres.url, [sid], 5)
            first.send_signal(signal.SIGKILL)
            first.wait()
            partial = len(await wait_rows(postgres.url, [sid], 0))
            stats = await feed
            second = start_worker()
            try:
                await wait_rows(postgres.url, [sid], stats.batches, timeout=180)
                # Past one more ack wait, so a late redelivery would have made its second row by now.
                await asyncio.sleep(6)
                rows = await wait_rows(postgres.url, [sid], 0)
            finally:
                second.terminate()
                second.wait(30)
        finally:
            if first.poll() is None:
                first.kill()
    assert stats.batches == 25 and partial < 25
    assert sorted(r["batch_seq"] for r in rows) == list(range(25))
    assert all(r["status"] == "ok" for r in rows)
    # The receivers' stream holds each batch exactly once (JetStream dropped any re-publish).
    seqs = []
    sub = await bus.js.subscribe(busmod.compressed_subject(sid), ordered_consumer=True)
    try:
        while True:
            msg = await sub.next_msg(timeout=2)
            seqs.append(msgpack.unpackb(await bus.payload(msg), raw=False)["batch_seq"])
    except Exception:
        pass
    assert sorted(seqs) == list(range(25))


async def test_postgres_down_for_20s_loses_no_rows(bus, bus_cfg, tmp_path):
    from shared.embedded import PostgresServer

    pg = PostgresServer(tmp_path / "pg").start()
    sid = unique("pgdown")
    try:
        async with running(compressor(bus_cfg), metrics_writer(bus_cfg, pg.url)):
            await ingest(bus, SOURCE, sid, 8, 24, progress=False)
            await wait_rows(pg.url, [sid], 3)
            pg.stop()
            await ingest(bus, SOURCE, sid, 8, 64, start_seq=3, progress=False)
            await asyncio.sleep(20)
            pg.start()
            rows = await wait_rows(pg.url, [sid], 11, timeout=120)
    finally:
        pg.stop()
    assert sorted(r["batch_seq"] for r in rows) == list(range(11))


async def test_the_neural_codec_runs_in_the_pipeline_and_rows_report_its_payloads(
    bus, bus_cfg, nats_server, postgres, tiny_model, tiny_models_dir
):
    from shared.codecs import decode_payload
    from shared.quality import measure_batch

    sid = unique("neural")
    source = "lavfi:testsrc2=size=128x96:rate=30"
    # The worker runs as its own process, as in production (torch only ever in that process).
    # Target 0 and no size comparison: the (untrained, poor) tiny model's payloads go out as they are.
    env = {**os.environ, **nats_server.env("compressor"), "AIC_MODELS_DIR": str(tiny_models_dir)}
    worker = subprocess.Popen(
        [sys.executable, "-m", "services.compressor", "--codec", "neural", "--model", tiny_model, "--level", "6",
         "--quality-frames", "-1", "--target", "psnr_y:0", "--compare-every", "0"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with running(metrics_writer(bus_cfg, postgres.url)):
            await ingest(bus, source, sid, 4, 8, progress=False)
            rows = await wait_rows(postgres.url, [sid], 2)
    finally:
        worker.terminate()
        worker.wait(30)
    payloads = {}
    sub = await bus.js.subscribe(busmod.compressed_subject(sid), ordered_consumer=True)
    while len(payloads) < 2:
        cb = msgpack.unpackb(await bus.payload(await sub.next_msg(timeout=10)), raw=False)
        payloads[cb["batch_seq"]] = cb["payload"]
    frames = [b.frames for b in read_batches(source, "ref", 4, 8)]
    for r in rows:
        assert r["status"] == "ok" and r["codec"] == "neural" and "level=6" in r["codec_params"]
        assert r["level"] == 6 and r["fallback_reason"] is None and r["baseline_bytes"] is None
        payload = payloads[r["batch_seq"]]
        assert r["compressed_bytes"] == len(payload)
        _, decoded = decode_payload(payload)
        # What the row says is what a receiver gets.
        assert abs(measure_batch(frames[r["batch_seq"]], decoded, 128, 96, 0).psnr_y - r["psnr_y"]) < 0.01


async def test_a_late_failure_report_for_a_batch_that_made_its_ok_row_adds_no_second_row(bus, bus_cfg, postgres):
    # E.g. the worker published its results but its ack was lost on the last delivery: JetStream then
    # announces the batch as exhausted, and a worker reports it failed.  Its ok row must stay the only one.
    sid = unique("late")
    await ingest(bus, SOURCE, sid, 4, 4, progress=False)
    stored = await bus.js.get_last_msg(busmod.FRAMES_STREAM, busmod.frames_subject(sid))
    assert stored.headers.get(busmod.CAPTURED_HEADER)  # the gateway says when it captured the batch
    worker = compressor(bus_cfg)
    async with running(worker, metrics_writer(bus_cfg, postgres.url)):
        await wait_rows(postgres.url, [sid], 1)
        publish = worker.bus.publish

        async def after_the_dedup_window(subject, data, msg_id, **kw):  # JetStream would take it as new
            return await publish(subject, data, f"{msg_id}:later", **kw)

        worker.bus.publish = after_the_dedup_window
        try:
            await worker._report_failure(stored, stored.seq, "failed", "no worker answered in 4 deliveries", 4)
        finally:
            worker.bus.publish = publish
        await asyncio.sleep(2)  # several flushes of the metrics writer
        rows = await wait_rows(postgres.url, [sid], 1)
    assert [(r["batch_seq"], r["status"]) for r in rows] == [(0, "ok")]
