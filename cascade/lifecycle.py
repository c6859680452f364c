"""One shape for components that own several resources (clients, servers, processes, tasks).

Subclasses open everything in :meth:`AsyncResourceGroup._start`, entering each resource into
``self._stack`` (or registering its clean-up there); leaving the ``async with`` block, or a
failed start, closes them in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, Self


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel an owned background task (if any) and wait until it has ended."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


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
