"""mapper.ticks: periodic loops sleep to the same grid, so a quiet mapper wakes once per period."""

from __future__ import annotations

import asyncio

from mapper.ticks import next_tick, sleep_to_tick, sleep_until


def test_next_tick_is_the_next_multiple_strictly_after_now():
    assert next_tick(2.3, 1.0) == 3.0
    assert next_tick(3.0, 1.0) == 4.0
    assert next_tick(59.9, 30.0) == 60.0
    assert next_tick(0.26, 0.25) == 0.5


async def test_loops_with_the_same_period_wake_in_the_same_loop_iteration():
    """Two loops sleeping to the next tick run in the same event-loop iteration (one wake-up):
    both resume before anything either of them schedules with call_soon."""
    loop = asyncio.get_running_loop()
    order: list[str] = []

    async def sleeper(name: str) -> None:
        await sleep_to_tick(0.5)
        order.append(name)
        loop.call_soon(order.append, f"after {name}")

    # Start just after a tick: both sleepers pick the same next one (unless the loop stalls ~0.5 s).
    await sleep_to_tick(0.5)
    first = asyncio.create_task(sleeper("a"))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(sleeper("b"))
    await asyncio.gather(first, second)
    await asyncio.sleep(0)
    assert order == ["a", "b", "after a", "after b"]


async def test_sleep_until_never_wakes_early_and_cleans_up_when_cancelled():
    loop = asyncio.get_running_loop()
    when = loop.time() + 0.02
    await sleep_until(when)
    assert loop.time() >= when
    task = asyncio.create_task(sleep_until(loop.time() + 30))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
