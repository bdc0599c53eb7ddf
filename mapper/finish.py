"""Work that, once begun, runs to its end even when the one awaiting it is cancelled.

A DMI call is cancelled by grpc.aio once edgecore's deadline passes, and a device switch may
outlast it (a stop waits for a driver call in progress). Cancelled half way, devices stopped for
the switch stayed stopped and the KubeEdge state file was not saved. The caller still sees its
CancelledError; the work goes on in a task of its own, kept in `running` so that a stop can wait
for it, and a failure nobody awaits any more is logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger("mapper")


async def to_the_end(work: Coroutine[Any, Any, T], running: set[asyncio.Future[Any]], what: str) -> T:
    """Await `work` in a task that a cancellation of this caller does not cancel."""
    task = asyncio.ensure_future(work)
    running.add(task)
    task.add_done_callback(running.discard)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(lambda t: _orphan_done(t, what))  # (run at once if it is done already)
        raise


async def outcome(work: asyncio.Future[Any]) -> asyncio.CancelledError | None:
    """Wait until `work` is done, whatever cancels the caller meanwhile; the cancel to raise once
    the caller has acted on the outcome, or None.

    For a commit handed to the twin thread: a cancel does not stop that thread, so a caller that
    gave up at once would take a commit that went through for one that did not, and do it again."""
    cancelled: asyncio.CancelledError | None = None
    while not work.done():
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError as exc:
            cancelled = exc
        except BaseException:  # noqa: BLE001 - the work failed: the caller reads work.result()
            break
    return cancelled


def _orphan_done(task: asyncio.Future[Any], what: str) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("%s, whose caller was cancelled, failed: %s: %s", what, type(exc).__name__, exc)
