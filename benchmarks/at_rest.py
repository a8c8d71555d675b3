"""What encrypting the embedded JetStream store at rest costs: publish throughput of 720p batches.

Two embedded NATS servers side by side, one with the store encrypted (the default:
``cipher: chachapoly``), one without; the same frame batches (8 frames of 1280x720
yuv420p, 11 MB) are published to each in turn, acknowledged by JetStream (so
written to its store), for ``--batches`` rounds.  Prints MB/s for each and the
ratio, measured in one run on this machine.

    python -m benchmarks.at_rest [--batches 40]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from shared import bus as busmod
from shared.bus import Bus
from shared.embedded import NatsServer
from shared.schemas import FrameBatch


async def run(batches: int) -> dict:
    w, h = 1280, 720
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (8, w * h * 3 // 2), dtype=np.uint8)  # incompressible, like real frames
    with tempfile.TemporaryDirectory() as tmp:
        servers = {name: NatsServer(Path(tmp) / name, encrypt=name == "encrypted").start()
                   for name in ("encrypted", "plain")}
        try:
            buses = {name: await Bus.connect(s.client(), f"at-rest-{name}")
                     for name, s in servers.items()}
            for b in buses.values():
                await b.ensure_topology()
            seconds = dict.fromkeys(buses, 0.0)
            for i in range(batches):
                for name, b in buses.items():  # alternate, so that machine noise hits both alike
                    fb = FrameBatch(f"rest{i % 4}", i, w, h, 30, 1, 0, time.time(), frames)
                    data = fb.pack()
                    t0 = time.perf_counter()
                    await b.publish(busmod.frames_subject(fb.stream_id), data, fb.msg_id, kind="frames")
                    seconds[name] += time.perf_counter() - t0
            for b in buses.values():
                await b.close()
        finally:
            for s in servers.values():
                s.stop()
    mb = batches * frames.nbytes / 1e6
    return {name: mb / s for name, s in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.at_rest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=40, help="720p batches published to each server (default %(default)s)")
    a = p.parse_args(argv)
    rate = asyncio.run(run(a.batches))
    print(f"# {os.cpu_count()} CPUs; {a.batches} batches of 8 720p frames (11.1 MB) to each server, alternately")
    print(f"encrypted store {rate['encrypted']:7.1f} MB/s   plain store {rate['plain']:7.1f} MB/s   "
          f"encrypted / plain = {rate['encrypted'] / rate['plain']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
