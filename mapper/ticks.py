"""One clock grid for every periodic loop, so that a quiet mapper wakes once a second, not five times.

On small machines (and VMs) waking a sleeping process is the expensive part of a quiet
mapper: 100-250 us of CPU per wake-up was measured here, more than the work done in it. The
device loops, the desired-value poll, the MQTT keepalive check, the outbox ack fallback
and the history pruning all sleep to the next multiple of their period on the event
loop's clock. Timers due at the same instant run in the same loop iteration, so a device
collecting every second and all the housekeeping share one wake-up.
"""

from __future__ import annotations

import asyncio
import math


def next_tick(now: float, period: float) -> float:
    """The first multiple of `period` after `now`."""
    return (math.floor(now / period) + 1) * period


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def sleep_until(when: float) -> None:
    """Sleep until the event loop's clock reads `when` (an exact deadline, unlike sleep(delay))."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()
    timer = loop.call_at(when, _wake, future)
    try:
        await future
    finally:
        timer.cancel()


async def sleep_to_tick(period: float, *, at_least: float = 0.0) -> None:
    """Sleep until the next multiple of `period`, at least `at_least` seconds from now."""
    loop = asyncio.get_running_loop()
    await sleep_until(next_tick(loop.time() + at_least, period))
