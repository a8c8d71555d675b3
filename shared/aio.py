"""Small asyncio helpers the services share."""

from __future__ import annotations

import asyncio


async def pause(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds``, waking early when ``stop`` is set; returns whether it is set."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass
    return stop.is_set()
