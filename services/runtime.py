"""Process plumbing shared by the services: signal handling and the run loop."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

from shared import logs


def run_service(main: Callable[[asyncio.Event], Awaitable[int | None]]) -> int:
    """Run ``main(stop)`` until it returns; SIGINT/SIGTERM set ``stop`` for a clean drain."""
    logs.configure()

    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return int(await main(stop) or 0)

    return asyncio.run(runner())
