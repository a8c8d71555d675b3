"""``aic top`` (issue 14, item 7): what it shows is what the stack is doing — a backlog while no worker
runs, then frames out, latency split into waiting and coding, the codec mix — read from the bus and
the database of a real pipeline."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from services import top
from services.ingest import ingest
from shared.bus import Bus
from tests.conftest import compressor, metrics_writer, running, unique, wait_rows

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
SOURCE = "lavfi:testsrc2=size=96x64:rate=30"


async def test_top_shows_a_backlog_then_what_the_workers_coded(bus_cfg, nats_server, postgres):
    sid = unique("top")
    gw = await Bus.connect(nats_server.client("gateway"), name="gw")
    view = top.Top(bus_cfg, postgres.url, window_s=120)
    try:
        await ingest(gw, SOURCE, sid, 8, 8 * 10, progress=False)
        waiting = await view.snapshot()
        assert waiting.streams[sid].backlog == 10 and waiting.backlog == 10 and waiting.oldest_s >= 0
        assert waiting.problems == [] and "10 batches waiting" in top.headline(waiting)
        async with running(compressor(bus_cfg, codec="x264-psnr"), metrics_writer(bus_cfg, postgres.url)):
            await wait_rows(postgres.url, [sid], 10)
            await ingest(gw, SOURCE, sid, 8, 8 * 2, progress=False)  # two more: frames come in between samples
            await wait_rows(postgres.url, [sid], 12)
            snap = await view.snapshot()
    finally:
        await view.close()
        await gw.close()
    row = next(r for r in top.rows(snap) if r["stream"] == sid)
    assert snap.streams[sid].backlog == 0 and float(row["out f/s"]) == pytest.approx(96 / 120, rel=0.01)
    assert float(row["in f/s"]) > 0 and row["codecs"] == "x264-psnr 100%" and row["no payload"] == "0"
    w = snap.streams[sid].window
    assert w["latency_p50_ms"] >= w["coding_p50_ms"] > 0 and w["wait_p50_ms"] >= 0
    out = io.StringIO()
    Console(file=out, width=200).print(top.render(snap))
    assert sid in out.getvalue() and "latency p50/p99 ms" in out.getvalue()


async def test_top_says_what_it_cannot_reach(bus_cfg, tmp_path):
    view = top.Top(bus_cfg, "postgresql://nobody@127.0.0.1:1/none", window_s=10)
    try:
        snap = await view.snapshot()
    finally:
        await view.close()
    assert any(p.startswith("database:") for p in snap.problems)
