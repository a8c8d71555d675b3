"""Readiness under load: how long ``/readyz`` takes while the API serves many concurrent reads.

Starts the stack as ``aic up`` does (no compressor), makes a viewer token, then keeps ``--concurrency``
GETs of ``/api/v1/aic/metrics`` in flight for ``--seconds`` while asking ``/readyz`` every 0.1 s;
prints p50/p99/max of both.  The issue's figure before the fix: readyz 1.1 s p50, 6.9 s p99 at 200.

    python -m benchmarks.api_load [--concurrency 200] [--seconds 20] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from services.stack import Stack


def _stats(xs: list[float]) -> dict:
    a = np.array(xs) * 1000
    return {"n": len(xs), "p50_ms": round(float(np.percentile(a, 50)), 1), "p99_ms": round(float(np.percentile(a, 99)), 1),
            "max_ms": round(float(a.max()), 1)} if xs else {"n": 0}


async def load(api: str, token: str, concurrency: int, seconds: float) -> dict:
    headers = {"Authorization": f"Bearer {token}"}
    end = time.monotonic() + seconds
    reads, ready, codes = [], [], {}
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=api, headers=headers, timeout=60, limits=limits) as c:
        async def reader():
            while time.monotonic() < end:
                t = time.monotonic()
                r = await c.get("/api/v1/aic/metrics", params={"limit": 200})
                reads.append(time.monotonic() - t)
                codes[r.status_code] = codes.get(r.status_code, 0) + 1

        def prober():
            # On a thread and a client of its own, as an orchestrator's probe is: its times are the
            # server's, not the wait for this load generator's busy event loop.
            time.sleep(1.0)  # the load is on
            with httpx.Client(base_url=api, timeout=60) as probe:
                while time.monotonic() < end:
                    t = time.monotonic()
                    r = probe.get("/readyz")
                    ready.append(time.monotonic() - t)
                    codes[f"readyz {r.status_code}"] = codes.get(f"readyz {r.status_code}", 0) + 1
                    time.sleep(0.1)

        await asyncio.gather(asyncio.to_thread(prober), *(reader() for _ in range(concurrency)))
    return {"concurrency": concurrency, "seconds": seconds, "reads": _stats(reads), "readyz": _stats(ready),
            "status_codes": codes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, Stack(Path(tmp) / "data", compressors=0) as stack:
        token = subprocess.run([sys.executable, "-m", "services.cli", "token", "create", "--role", "viewer", "--name",
                                "load", "--data-dir", str(stack.data_dir)], capture_output=True, text=True, check=True)
        secret = next(w for w in token.stdout.split() if w.startswith("aic_"))
        deadline = time.monotonic() + 60
        while True:  # the service is up
            try:
                if httpx.get(f"{stack.api_url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the API did not become ready"
            time.sleep(0.5)
        result = asyncio.run(load(stack.api_url, secret, a.concurrency, a.seconds))
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        r, q = result["readyz"], result["reads"]
        print(f"{a.concurrency} concurrent GETs for {a.seconds:g} s: reads p50 {q['p50_ms']} ms, p99 {q['p99_ms']} ms "
              f"({q['n']}); /readyz p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, max {r['max_ms']} ms ({r['n']}); "
              f"status codes {result['status_codes']}")
    return 0 if result["readyz"].get("p99_ms", 1e9) < 1000 else 1


if __name__ == "__main__":
    sys.exit(main())
