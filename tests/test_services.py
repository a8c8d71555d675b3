"""Service behaviour seen from outside: the CLI, `aic up`, `aic demo`, the metrics writer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import asyncpg
import msgpack
import pytest

from shared import bus as busmod
from shared.schemas import BatchMetrics
from tests.conftest import metrics_writer, running, unique, wait_rows


def aic(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, **kw)


def no_named_servers() -> dict:
    """This process's environment without servers named in it: what `aic up` runs as on a fresh machine."""
    return {k: v for k, v in os.environ.items() if k not in ("AIC_NATS_URL", "AIC_DATABASE_URL")}


@pytest.mark.parametrize("command", ["up", "edge", "ingest", "compressor", "metrics", "decode", "demo", "db", "config", "report",
                                     "tenant", "token", "bus", "secrets", "train", "bench"])
def test_every_command_explains_itself(command):
    r = aic(command, "--help", timeout=60)
    assert r.returncode == 0
    assert "usage: aic " + command in r.stdout


def test_ingest_and_metrics_never_import_torch_or_codecs():
    code = (
        "import sys, services.cli, services.ingest, services.metrics;"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('shared.codecs')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_missing_source_is_a_clear_error(nats_server):
    r = aic("ingest", "/no/such/clip.mp4", "--stream-id", "x", "--nats-url", nats_server.url, timeout=60,
            env={**os.environ, **nats_server.env("gateway")})
    assert r.returncode == 2
    assert "cannot open '/no/such/clip.mp4'" in r.stderr
    assert "Traceback" not in r.stderr


async def test_a_redelivered_metrics_record_makes_no_second_row(bus, bus_cfg, postgres):
    sid = unique("dup")
    rec = BatchMetrics(f"{sid}:0", sid, "ok", "w1", time.time(), batch_seq=0, frames=8, psnr_y=40.0)
    async with running(metrics_writer(bus_cfg, postgres.url)):
        # Distinct message ids: JetStream cannot dedupe these, the database must.
        for i in range(3):
            await bus.js.publish(busmod.metrics_subject("w1"), rec.pack(), headers={"Nats-Msg-Id": f"x{i}"})
        await bus.js.publish(busmod.metrics_subject("w1"), b"\x01garbage", headers={"Nats-Msg-Id": "g"})
        nxt = BatchMetrics(f"{sid}:1", sid, "ok", "w1", time.time(), batch_seq=1)
        await bus.publish(busmod.metrics_subject("w1"), nxt.pack(), "x9")
        rows = await wait_rows(postgres.url, [sid], 2)
    assert [r["batch_id"] for r in rows] == [f"{sid}:0", f"{sid}:1"]
    conn = await asyncpg.connect(postgres.url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM batch_metrics WHERE stream_id = $1", sid) == 2
    finally:
        await conn.close()


@pytest.mark.slow
def test_aic_up_prints_its_urls_and_stops_cleanly_on_sigterm(tmp_path):
    env = no_named_servers()
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", "--data-dir", str(tmp_path / "aic")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    lines = []
    try:
        while not lines or not lines[-1].startswith("endpoints"):
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            lines.append(line)
        assert lines[0].startswith("NATS        tls://127.0.0.1:")
        assert lines[1].startswith("PostgreSQL  postgresql://postgres:***@127.0.0.1:")  # the password: in its file
        endpoints = tmp_path / "aic" / "endpoints.json"
        assert lines[-1].startswith(f"endpoints   {endpoints}") and oct(endpoints.stat().st_mode & 0o777) == "0o600"
        # The WebRTC edge: its pages for anyone, its sessions for tokens only (the stack has a token database).
        edge = re.search(r"WebRTC      (http://127\.0\.0\.1:\d+)/publish", "".join(lines)).group(1)
        _wait_for(lambda: _get(f"{edge}/healthz") == 200)
        assert _get(f"{edge}/publish") == 200
        whip = urllib.request.Request(f"{edge}/whip/cam1", data=b"v=0", method="POST",
                                      headers={"Content-Type": "application/sdp"})
        assert _get(whip) == 401
        # Another command run with the same data folder uses this stack's servers, no URL needed.
        got = aic("config", "get", "--data-dir", str(tmp_path / "aic"), env=env, timeout=60)
        assert got.returncode == 0, got.stderr
        while not line.startswith("services"):
            line = proc.stdout.readline()
            lines.append(line)
        # Prometheus on by default, on loopback, each service's port printed.
        prom = next(ln for ln in lines if ln.startswith("prometheus"))
        urls = dict(re.findall(r"(\S+) (http://127\.0\.0\.1:\d+/metrics)", prom))
        assert set(urls) == {"compressor-0", "metrics", "edge"}
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(urls["compressor-0"], timeout=2) as r:
                    assert b"aic_compressor_batches_total" in r.read()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.5)
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert not endpoints.exists()  # a stopped stack is found by nobody
    finally:
        if proc.poll() is None:
            proc.kill()
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert leftovers == []


@pytest.mark.slow
def test_demo_json_reports_every_batch(tmp_path):
    env = no_named_servers()
    r = aic("demo", "--streams", "2", "--frames", "24", "--json", "--data-dir", str(tmp_path / "d"), env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["batches_published"] == out["metrics_rows"] == out["batches_compressed"] == 6
    assert out["missing"] == out["duplicate_rows"] == 0
    assert out["frames"] == 48 and out["compressed_bytes"] < out["raw_bytes"]
    assert 30 < out["psnr_y_mean"] < 100 and 0.9 < out["ms_ssim_mean"] <= 1
    assert 0 < out["latency_p50_ms"] <= out["latency_p99_ms"]
    # The default: chained x264-psnr, so no fallback (there is no learned path to fall back from).
    assert out["codecs"] == ["x264-psnr"] and out["fallbacks"] == {}


@pytest.mark.slow
async def test_with_server_urls_set_the_stack_starts_no_server_and_uses_them(
    bus, nats_server, postgres, tmp_path, monkeypatch
):
    from services.ingest import ingest
    from services.stack import Stack

    for k, v in nats_server.env("admin").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AIC_DATABASE_URL", postgres.url)
    sid = unique("ext")
    with Stack(tmp_path / "aic") as stack:
        assert stack.nats is None and stack.postgres is None
        assert (stack.nats_url, stack.database_url) == (nats_server.url, postgres.url)
        await ingest(bus, "lavfi:testsrc2=size=160x120:rate=30", sid, 8, 16, progress=False)
        rows = await wait_rows(postgres.url, [sid], 2, timeout=120)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert not (tmp_path / "aic" / "nats").exists() and not (tmp_path / "aic" / "postgres").exists()


class _Msg:
    """Just enough of a JetStream message for the writer's flush."""

    def __init__(self, data: bytes, seq: int = 1):
        self.data, self.subject, self.acked, self.termed = data, "aic.metrics.w", False, False
        self.metadata = SimpleNamespace(sequence=SimpleNamespace(stream=seq))

    async def ack(self):
        self.acked = True

    async def term(self):
        self.termed = True

    async def in_progress(self):
        pass


class _FlakyStore:
    """Refuses the micro-batch (one bad record), then drops the connection once mid one-by-one."""

    def __init__(self):
        self.calls, self.rows, self.conn = 0, [], None

    async def write(self, records):
        self.calls += 1
        if len(records) > 1:
            raise asyncpg.DataError("value out of range")
        if self.calls == 3:
            raise asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command")
        if records[0][0].endswith(":1"):
            raise asyncpg.DataError("value out of range")
        self.rows.append(records[0][0])
        return 1


async def test_a_database_restart_during_the_one_by_one_fallback_loses_no_record():
    from services.metrics import MetricsWriter
    from shared.config import MetricsConfig

    writer = MetricsWriter(MetricsConfig(database_url="postgresql://unused"))
    writer.store = _FlakyStore()
    letters = []

    async def publish(subject, data, msg_id):
        letters.append(msgpack.unpackb(data))

    writer.bus = SimpleNamespace(publish=publish)
    msgs = [_Msg(BatchMetrics(f"s:{i}", "s", "ok", "w", time.time(), batch_seq=i).pack(), i) for i in range(4)]
    await writer._flush(msgs, asyncio.Event())
    # s:1 refused; nobody lost to the restart (s:0 is written again after it: the real table ignores repeats)
    assert set(writer.store.rows) == {"s:0", "s:2", "s:3"}
    assert [m.termed for m in msgs] == [False, True, False, False]
    assert [m.acked for m in msgs] == [True, False, True, True]
    # The refused record is kept whole on the dead-letter subject.
    assert [(d["status"], d["batch_id"], d["record"]) for d in letters] == [("refused_metrics", "s:1", msgs[1].data)]


async def test_records_no_row_could_hold_go_to_dead_letters_and_the_writer_keeps_writing(bus, bus_cfg, postgres):
    sid = unique("bad")
    good = BatchMetrics(f"{sid}:1", sid, "ok", "w1", time.time(), batch_seq=1)
    bad = [
        BatchMetrics(f"{sid}:0", sid, "ok", "w1", time.time(), captured_at=time.time() * 1000).pack(),
        BatchMetrics(f"{sid}:0", sid, "ok", "w1", time.time(), reason="nul \x00 in text").pack(),
        BatchMetrics(f"{sid}:0", sid, "ok", "w1", time.time(), extra={"note": "\x00"}).pack(),
        # A newer schema (a rolling upgrade): kept whole, to replay once this writer knows it.
        msgpack.packb({**msgpack.unpackb(good.pack()), "v": 99}),
    ]
    async with running(metrics_writer(bus_cfg, postgres.url)) as tasks:
        for i, data in enumerate(bad):
            await bus.publish(busmod.metrics_subject("w1"), data, f"bad{sid}{i}")
        await bus.publish(busmod.metrics_subject("w1"), good.pack(), f"good{sid}")
        rows = await wait_rows(postgres.url, [sid], 1)
        assert not any(t.done() for t in tasks)
    assert [r["batch_id"] for r in rows] == [f"{sid}:1"]
    sub = await bus.js.subscribe(busmod.deadletter_subject(sid), ordered_consumer=True)
    letters = [msgpack.unpackb((await sub.next_msg(timeout=5)).data) for _ in bad]
    await sub.unsubscribe()
    assert [d["status"] for d in letters] == ["invalid_metrics"] * len(bad)
    assert [d["record"] for d in letters] == bad
    assert "NUL" in letters[1]["reason"] and "version" in letters[3]["reason"]


def test_only_data_and_constraint_errors_blame_the_record():
    from asyncpg import exceptions as e

    from services.metrics.writer import is_outage

    for exc in (e.DiskFullError("x"), e.ReadOnlySQLTransactionError("x"), e.DeadlockDetectedError("x"),
                e.TooManyConnectionsError("x"), e.SerializationError("x"), e.UndefinedTableError("x"),
                e.AdminShutdownError("x"), ConnectionResetError()):  # fmt: skip
        assert is_outage(exc), exc
    for exc in (e.CharacterNotInRepertoireError("x"), e.UniqueViolationError("x"), e.CheckViolationError("x"),
                e.NumericValueOutOfRangeError("x")):  # fmt: skip
        assert not is_outage(exc), exc


def test_a_dead_nats_server_is_a_clear_error_not_a_hang():
    from shared.embedded import free_port

    r = aic("config", "get", "cam", "--nats-url", f"nats://127.0.0.1:{free_port()}", timeout=60)
    assert r.returncode == 2, r.stderr
    assert "no NATS server answered" in r.stderr and "Traceback" not in r.stderr


def test_ingesting_a_stream_again_continues_its_numbering_and_reusing_numbers_is_refused(nats_server):
    sid = unique("again")
    env = {**os.environ, **nats_server.env("gateway")}
    args = ("ingest", "lavfi:testsrc2=size=64x48:rate=30", "--stream-id", sid, "--frames", "16",
            "--nats-url", nats_server.url)
    first = aic(*args, timeout=120, env=env)
    assert first.returncode == 0 and "warning" not in first.stderr, first.stderr
    again = aic(*args, timeout=120, env=env)  # a restarted gateway: batches 2 and 3, nothing dropped
    assert again.returncode == 0 and "warning" not in again.stderr, again.stderr
    reused = aic(*args, "--start-seq", "1", timeout=120, env=env)
    assert reused.returncode == 2 and "use --start-seq 4 or more" in reused.stderr, reused.stderr
    assert "Traceback" not in reused.stderr
    later = aic(*args, "--start-seq", "10", timeout=120, env=env)  # a gap is allowed: receivers skip it
    assert later.returncode == 0, later.stderr


async def test_a_restarted_ingest_publishes_the_next_batch_numbers(bus):
    from services.ingest import ingest

    sid = unique("cont")
    first = await ingest(bus, "lavfi:testsrc2=size=64x48:rate=30", sid, 8, 16, progress=False)
    second = await ingest(bus, "lavfi:testsrc2=size=64x48:rate=30", sid, 8, 16, progress=False)
    assert first.batch_ids == [f"{sid}:0", f"{sid}:1"] and second.batch_ids == [f"{sid}:2", f"{sid}:3"]
    assert second.duplicates == 0


async def test_two_gateways_on_one_stream_id_are_caught_before_they_number_a_batch_twice(bus):
    from services.ingest.gateway import BatchNumberError, BatchNumbers

    sid = unique("twice")
    kv = await bus.ingest_kv()
    a, b = BatchNumbers(kv, sid), BatchNumbers(kv, sid)
    assert await a.load() == 0 and await b.load() == 0
    await a.reserve(1)
    with pytest.raises(BatchNumberError, match="another ingest is publishing"):
        await b.reserve(1)
    await a.reserve(2)  # the first gateway goes on
    assert await BatchNumbers(kv, sid).load() == 2


async def test_a_stop_ends_an_ingest_whose_live_source_went_quiet(bus, monkeypatch):
    import threading

    from services.ingest import gateway

    real, quiet = gateway.read_batches, threading.Event()

    def goes_quiet(*args, **kw):
        yield next(real(*args, **kw))
        quiet.wait(60)  # a live feed that stopped sending

    monkeypatch.setattr(gateway, "read_batches", goes_quiet)
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.ingest(bus, "lavfi:testsrc2=size=64x48:rate=30", unique("quiet"), 4, 64,
                                              stop=stop, progress=False))
    await asyncio.sleep(1.0)
    stop.set()
    try:
        stats = await asyncio.wait_for(task, timeout=5)
    finally:
        quiet.set()
    assert stats.batches == 1


@contextlib.contextmanager
def _up(folder, env):
    """``aic up`` on ``folder`` once it names its services; killed on the way out if still running."""
    proc = _start_up(folder, env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()


def _start_up(folder, env):
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--data-dir", str(folder)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    while True:  # up once it names its services
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        if line.startswith("services"):
            return proc


def _wait_for(check, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.25)
    raise AssertionError("condition not reached in time")


def _get(request) -> int | None:
    """The HTTP status of a request (None: nothing answered)."""
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def _alive_pid(path) -> int | None:
    try:
        pid = int(path.read_text().split()[0])
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, IndexError, ProcessLookupError):
        return None


@pytest.mark.slow
def test_kill_9_of_aic_up_leaves_no_orphan_and_a_second_aic_up_on_its_folder_is_refused(tmp_path):
    env = no_named_servers()
    folder = tmp_path / "aic"
    with _up(folder, env) as first:
        second = aic("up", "--data-dir", str(folder), env=env, timeout=60)
        assert second.returncode == 2 and f"another aic up (pid {first.pid})" in second.stderr, second.stderr
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        # NATS, PostgreSQL and the services die with it.
        _wait_for(lambda: not subprocess.run(["pgrep", "-f", str(folder)], capture_output=True, text=True).stdout.split(),
                  timeout=30)
        with _up(folder, env) as again:  # the folder is free again, and its stores are whole
            again.send_signal(signal.SIGTERM)
            assert again.wait(60) == 0


@pytest.mark.slow
def test_aic_up_restarts_a_nats_server_or_postgres_that_died(tmp_path):
    env = no_named_servers()
    folder = tmp_path / "aic"
    with _up(folder, env) as proc:
        for pidfile in (folder / "nats" / "nats-server.pid", folder / "postgres" / "pgdata" / "postmaster.pid"):
            old = _wait_for(lambda: _alive_pid(pidfile))
            os.kill(old, signal.SIGKILL)
            _wait_for(lambda: (_alive_pid(pidfile) or old) != old, timeout=90)
        # Back at the same addresses: another command reaches both through the endpoints file.
        got = aic("config", "get", "--data-dir", str(folder), env=env, timeout=60)
        assert got.returncode == 0, got.stderr
        got = aic("db", "migrate", "--data-dir", str(folder), env=env, timeout=60)
        assert got.returncode == 0 and "up to date" in got.stdout, got.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


def test_no_log_event_passes_a_field_structlog_uses_for_itself():
    """structlog's ``level`` (and ``event``, ``timestamp``) would overwrite such a field: the batch
    line once showed "level": "info" where the rate level should be."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    reserved = {"level", "event", "timestamp", "logger"}
    found = []
    for path in [*root.glob("services/**/*.py"), *root.glob("shared/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "log"
                    and node.func.attr in ("debug", "info", "warning", "error", "critical", "exception")):
                found += [f"{path.name}:{node.lineno} {k.arg}" for k in node.keywords if k.arg in reserved]
    assert found == []
