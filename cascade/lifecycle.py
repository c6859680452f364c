"""One shape for components that own several resources (clients, servers, processes, tasks).

Subclasses open everything in :meth:`AsyncResourceGroup._start`, entering each resource into
``self._stack`` (or registering its clean-up there); leaving the ``async with`` block, or a
failed start, closes them in reverse order.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, Final, Self

logger = logging.getLogger(__name__)

RECANCEL_S: Final = 0.05
"""How long :func:`stop_task` and :func:`cancel_and_wait` wait on one cancellation before they
send another."""
SLOW_STOP_S: Final = 1.0
"""How long :func:`cancel_and_wait` waits for a cancelled task before it says so (and goes on)."""


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel an owned background task (if any) and wait until it has ended, however long:
    :func:`stop_task` over and over, each round bounded by :data:`SLOW_STOP_S` and said at
    WARNING when it runs out. An error the task ended with is logged, not raised, so the
    caller's own clean-up after it still runs."""
    if task is None:
        return
    while not await stop_task(task, within_s=SLOW_STOP_S):
        pass
    if not task.cancelled() and (error := task.exception()) is not None:
        logger.warning("%s had ended with %r", task.get_name(), error)


async def stop_task(
    task: asyncio.Task[Any], *, grace_s: float = 0.0, within_s: float = 1.0
) -> bool:
    """Let ``task`` end on its own for ``grace_s``, then cancel it until it has ended, for at
    most ``within_s`` more; whether it ended (an error it ended with is logged, not raised).

    One cancellation is not always enough. On Python 3.11, ``asyncio.wait_for`` returns its
    inner future's result when a cancellation lands in the loop turn that completes that
    future (CPython gh-86296, gone in 3.12), and nats-py waits on each protocol line with it: a
    connect to a server that refuses the login, cut short by a timeout, lost that cancellation
    and went on retrying forever, on a busy host one time in a few. So a cancellation is sent
    again every :data:`RECANCEL_S` until the task is done. The caller's own cancellation while
    this waits is held back until then and raised after."""
    loop = asyncio.get_running_loop()
    cancelled = False
    if grace_s > 0 and not task.done():
        try:
            await asyncio.wait({task}, timeout=grace_s)
        except asyncio.CancelledError:
            cancelled = True
    deadline = loop.time() + within_s
    while not task.done() and (left := deadline - loop.time()) > 0:
        task.cancel()
        try:
            await asyncio.wait({task}, timeout=min(RECANCEL_S, left))
        except asyncio.CancelledError:
            cancelled = True
    if task.done() and not task.cancelled() and (error := task.exception()) is not None:
        logger.debug("%s ended with %r", task.get_name(), error)
    elif not task.done():
        logger.warning("%s did not end within %.1f s of being cancelled", task.get_name(), within_s)
    if cancelled:
        raise asyncio.CancelledError
    return task.done()


class AsyncResourceGroup:
    """Async context manager over an ``AsyncExitStack`` that ``_start`` fills."""

    def __init__(self) -> None:
        self._stack = AsyncExitStack()

    async def _start(self) -> None:
        """Open the resources, entering each into ``self._stack``."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()
