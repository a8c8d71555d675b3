"""Why the claim check uses a blob stream and direct get, not the nats-py object store.

Moves the same bytes through both, side by side, on an embedded NATS server:

    python benchmarks/claim_check.py [--mb 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from nats.js.api import ObjectMeta, ObjectMetaOptions

from shared import bus as busmod
from shared.bus import Bus
from shared.config import BusConfig
from shared.embedded import NatsServer


async def run(cfg: BusConfig, mb: int) -> None:
    bus = await Bus.connect(cfg, name="claim-bench")
    await bus.ensure_topology()
    data = os.urandom(mb * 1024 * 1024)
    obs = await bus.js.create_object_store("bench")
    for chunk_kib in (128, 1024, 4096):
        name = f"o{chunk_kib}"
        t0 = time.perf_counter()
        opts = ObjectMetaOptions(max_chunk_size=chunk_kib * 1024)
        await obs.put(name, data, meta=ObjectMeta(name=name, options=opts))
        t1 = time.perf_counter()
        got = await obs.get(name)
        t2 = time.perf_counter()
        assert got.data == data
        print(f"object store, {chunk_kib:5d} KiB chunks : put {mb / (t1 - t0):6.0f} MB/s   get {mb / (t2 - t1):6.0f} MB/s")
    # The project's claim check: one publish of the whole message, read back as a consumer would.
    subject = busmod.compressed_subject("claimbench")
    t0 = time.perf_counter()
    await bus.publish(subject, data, "claimbench:0", kind="bench")
    t1 = time.perf_counter()
    sub = await bus.js.subscribe(subject, ordered_consumer=True)
    msg = await sub.next_msg(timeout=30)
    got = await bus.payload(msg)
    t2 = time.perf_counter()
    assert got == data
    print(f"aic claim check (blob stream, direct get) : put {mb / (t1 - t0):6.0f} MB/s   get {mb / (t2 - t1):6.0f} MB/s")
    await bus.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=100, help="MiB moved per variant (default 100)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp)).start()
        try:
            print(f"embedded nats-server, max_payload {server.max_payload}, {a.mb} MiB per variant")
            asyncio.run(run(server.client("admin"), a.mb))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
