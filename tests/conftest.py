"""Fixtures: real embedded servers on free ports, and in-process services."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from pathlib import Path

import asyncpg
import pytest

from services.compressor import Compressor
from services.metrics import MetricsWriter
from shared.bus import Bus
from shared.aio import run_blocking
from shared.config import BusConfig, CompressorConfig, MetricsConfig
from shared.embedded import NatsServer, PostgresServer


@pytest.fixture(scope="session")
def postgres(tmp_path_factory) -> PostgresServer:
    server = PostgresServer(tmp_path_factory.mktemp("pg")).start()
    yield server
    server.stop()


@pytest.fixture
def nats_server(tmp_path) -> NatsServer:
    """A fresh NATS per test (no stream state leaks between tests), as ``aic up`` leaves it: secured
    (TLS, a user per role) and with the topology the admin creates."""
    server = NatsServer(tmp_path / "nats").start()
    try:
        run_blocking(create_topology(server))
        yield server
    finally:
        server.stop()


@pytest.fixture
def bare_nats_server(tmp_path) -> NatsServer:
    """A fresh NATS with no streams yet."""
    server = NatsServer(tmp_path / "nats").start()
    yield server
    server.stop()


async def create_topology(server: NatsServer) -> None:
    bus = await Bus.connect(server.client("admin"), name="test-topology")
    try:
        await bus.ensure_topology()
    finally:
        await bus.close()


@pytest.fixture
def bus_cfg(nats_server) -> BusConfig:
    return nats_server.client("admin", ack_wait_s=10.0, max_deliver=3)


@pytest.fixture
async def bus(bus_cfg) -> Bus:
    b = await Bus.connect(bus_cfg, name="test")
    await b.ensure_topology()
    yield b
    await b.close()


def unique(prefix: str = "s") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@contextlib.asynccontextmanager
async def running(*services):
    """Run services' ``run(stop)`` as tasks; stop and await them on exit."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(s.run(stop)) for s in services]
    try:
        yield tasks
    finally:
        stop.set()
        await asyncio.gather(*tasks)


def compressor(bus_cfg: BusConfig, **kw) -> Compressor:
    kw.setdefault("codec", "x264")  # fast; the neural path has its own tests
    kw.setdefault("quality_every", 1)  # every row measured, so tests can hold each to its frames
    return Compressor(CompressorConfig(bus=bus_cfg, worker_id=kw.pop("worker_id", unique("w")), **kw))


def metrics_writer(bus_cfg: BusConfig, database_url: str) -> MetricsWriter:
    return MetricsWriter(MetricsConfig(bus=bus_cfg, database_url=database_url, flush_interval_s=0.1))


async def wait_rows(url: str, stream_ids: list[str], n: int, timeout: float = 120.0) -> list[asyncpg.Record]:
    """All rows of these streams once there are at least ``n`` (fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    rows: list = []
    while time.monotonic() < deadline:
        try:
            conn = await asyncpg.connect(url)
            try:
                rows = await conn.fetch(
                    "SELECT * FROM batch_metrics WHERE stream_id = ANY($1::text[]) ORDER BY stream_id, batch_seq",
                    stream_ids,
                )
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError):
            rows = []
        if len(rows) >= n:
            return rows
        await asyncio.sleep(0.2)
    raise AssertionError(f"expected {n} rows for {stream_ids}, got {len(rows)} after {timeout}s")


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory):
    """A models folder holding 'tiny' (image codec) and 'tiny-restore' (hybrid): small untrained models.

    Untrained weights code badly but exercise every mechanism (bitstreams,
    integer hyper-synthesis, tables, padding) in milliseconds.
    """
    torch = pytest.importorskip("torch")
    from shared.neural.export import export_weights
    from shared.neural.models import MeanScaleHyperprior
    from shared.neural.training import TrainConfig, save_checkpoint

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    cfg = TrainConfig(data="none", n=16, m=24)
    net = MeanScaleHyperprior(cfg.n, cfg.m, len(cfg.lambdas))
    save_checkpoint(root / "ckpt.pt", net, torch.optim.Adam(net.parameters()), 0, cfg)
    export_weights(root / "ckpt.pt", root / "tiny")
    # The same with a checkerboard context that is not zero (untrained), so that it moves the bits.
    from shared.neural.models import CheckerboardHyperprior

    cb_cfg = TrainConfig(data="none", n=16, m=24, arch="checkerboard")
    cb = CheckerboardHyperprior(cb_cfg.n, cb_cfg.m, len(cb_cfg.lambdas))
    cb.load_state_dict(net.state_dict(), strict=False)
    torch.nn.init.normal_(cb.ctx[1].weight, std=0.05)
    save_checkpoint(root / "ckpt-cb.pt", cb, torch.optim.Adam(cb.parameters()), 0, cb_cfg)
    export_weights(root / "ckpt-cb.pt", root / "tiny-cb")

    from shared.neural.restoration import RestorationNet
    from shared.neural.restore_training import save_weights

    restore = RestorationNet(channels=8, depth=3, levels=8)
    torch.nn.init.normal_(restore.tail.weight, std=0.02)  # untrained but not the identity
    save_weights(restore, root / "tiny-restore")
    return root


@pytest.fixture
def tiny_model(tiny_models_dir, monkeypatch):
    monkeypatch.setenv("AIC_MODELS_DIR", str(tiny_models_dir))
    return "tiny"


@pytest.fixture(params=["tiny", "tiny-cb"])
def any_tiny_model(request, tiny_models_dir, monkeypatch):
    """Each tiny image codec: the hyperprior and its checkerboard-context variant."""
    monkeypatch.setenv("AIC_MODELS_DIR", str(tiny_models_dir))
    return request.param


def corrupted_payloads(payload: bytes, count: int, seed: int = 1):
    """``count`` damaged copies of an aic payload: bit flips, truncations, garbage bitstreams, bad headers."""
    import numpy as np

    from shared.codecs import read_header

    header_len = len(payload) - len(read_header(payload)[1])
    rng = np.random.default_rng(seed)
    for k in range(count):
        p = bytearray(payload)
        kind = k % 4
        if kind == 0:  # flip bits anywhere
            for i in rng.integers(0, len(p), rng.integers(1, 6)):
                p[i] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:  # truncate
            p = p[: int(rng.integers(0, len(p)))]
        elif kind == 2:  # garbage in the bitstream only
            i = int(rng.integers(header_len, len(p)))
            p[i:] = rng.integers(0, 256, len(p) - i, dtype=np.uint8).tobytes()
        else:  # overwrite bytes in the header
            for i in rng.integers(0, header_len, 3):
                p[i] = rng.integers(0, 256)
        yield bytes(p)


async def record_fault(name: str, url: str, stream_ids: list[str], published: int, fault_at: float | None = None,
                       dropped: int = 0) -> dict:
    """The figures of a fault run (docs/reliability.md): batches published, rows, duplicates, missing,
    counted drops, and the recovery time (from the fault to the next row written).  Appended as a JSON
    line to ``$AIC_FAULT_TABLE`` when set (``python -m benchmarks.fault_table`` prints the table)."""
    import json
    import os

    conn = await asyncpg.connect(url)
    try:
        r = await conn.fetchrow(
            "SELECT count(*) AS rows, count(DISTINCT (stream_id, batch_seq)) AS distinct_batches, "
            "extract(epoch FROM min(inserted_at) FILTER (WHERE inserted_at > to_timestamp($2))) AS next_row "
            "FROM batch_metrics WHERE stream_id = ANY($1::text[])", stream_ids, fault_at or 0.0)
    finally:
        await conn.close()
    figures = {"fault": name, "published": published, "rows": r["rows"],
               "duplicates": r["rows"] - r["distinct_batches"], "missing": published - r["distinct_batches"],
               "dropped_counted": dropped,
               "recovery_s": None if fault_at is None or r["next_row"] is None else round(float(r["next_row"]) - fault_at, 1)}
    out = os.environ.get("AIC_FAULT_TABLE")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(figures) + "\n")
    return figures
