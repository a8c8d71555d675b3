"""What TLS on the bus costs: throughput and CPU per 720p frame batch, with and without TLS.

Two embedded NATS servers side by side, configured as ``aic up`` starts them (users per role,
store encrypted at rest), one with TLS on its client port (the default) and one without.  Each
round publishes one frame batch (8 frames of 1280x720 yuv420p, 11 MB) as the gateway, waits for
JetStream's ack, then fetches and acks it as a compressor does; the two servers take turns, so
that machine noise hits both alike.  Prints, for each: MB/s through the bus (publish + fetch),
and CPU milliseconds per batch in the clients (this process) and in nats-server.

    python -m benchmarks.bus_tls [--batches 40]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from shared import bus as busmod
from shared.bus import Bus
from shared.embedded import NatsServer
from shared.schemas import FrameBatch


async def run(batches: int) -> dict:
    w, h = 1280, 720
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (8, w * h * 3 // 2), dtype=np.uint8)  # incompressible, like real frames
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        servers = {name: NatsServer(Path(tmp) / name, tls=name == "tls").start() for name in ("tls", "plain")}
        try:
            ends = {}
            for name, s in servers.items():
                admin = await Bus.connect(s.client("admin"), f"tls-bench-{name}")
                await admin.ensure_topology()
                await admin.close()
                gw = await Bus.connect(s.client("gateway"), f"tls-bench-gw-{name}")
                cw = await Bus.connect(s.client("compressor"), f"tls-bench-cw-{name}")
                sub = await cw.pull(busmod.FRAMES_STREAM, busmod.COMPRESSOR_CONSUMER)
                ends[name] = (gw, cw, sub, psutil.Process(s.proc.pid))
            samples = {name: {"s": [], "client": [], "server": []} for name in servers}
            for i in range(batches + 2):
                for name, (gw, cw, sub, proc) in ends.items():
                    fb = FrameBatch("tls", i, w, h, 30, 1, 0, time.time(), frames)
                    data = fb.pack()
                    c0, s0, t0 = time.process_time(), sum(proc.cpu_times()[:2]), time.perf_counter()
                    await gw.publish(busmod.frames_subject(fb.stream_id), data, fb.msg_id, kind="frames")
                    (msg,) = await sub.fetch(1, timeout=30)
                    assert len(await cw.payload(msg)) == len(data)
                    await msg.ack_sync()
                    t1, c1, s1 = time.perf_counter(), time.process_time(), sum(proc.cpu_times()[:2])
                    if i >= 2:  # the first rounds warm up connections and the store
                        samples[name]["s"].append(t1 - t0)
                        samples[name]["client"].append(c1 - c0)
                        samples[name]["server"].append(s1 - s0)
            for gw, cw, sub, _ in ends.values():
                await gw.close()
                await cw.close()
        finally:
            for s in servers.values():
                s.stop()
    mb = len(data) / 1e6
    for name, d in samples.items():
        out[name] = {"mb_s": mb / statistics.median(d["s"]), "client_ms": 1e3 * statistics.mean(d["client"]),
                     "server_ms": 1e3 * statistics.mean(d["server"])}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bus_tls", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=40, help="720p batches through each server (default %(default)s)")
    a = p.parse_args(argv)
    r = asyncio.run(run(a.batches))
    print(f"# {os.cpu_count()} CPUs; {a.batches} batches of 8 720p frames (11.1 MB) through each server, "
          "alternately: publish (gateway) + fetch and ack (compressor)")
    print(f"{'':6} {'MB/s':>7} {'client CPU ms/batch':>20} {'nats-server CPU ms/batch':>25}")
    for name in ("tls", "plain"):
        print(f"{name:6} {r[name]['mb_s']:7.1f} {r[name]['client_ms']:20.1f} {r[name]['server_ms']:25.1f}")
    t, pl = r["tls"], r["plain"]
    print(f"tls / plain: throughput {t['mb_s'] / pl['mb_s']:.2f}, client CPU {t['client_ms'] / pl['client_ms']:.2f}, "
          f"server CPU {t['server_ms'] / pl['server_ms']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
