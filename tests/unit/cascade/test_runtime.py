"""``cascade.runtime.stopped_by_sigterm``: SIGTERM unwinds what the command started."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from cascade.runtime import stopped_by_sigterm


async def test_sigterm_cancels_the_command_runs_its_cleanup_and_exits_143() -> None:
    cleaned = asyncio.Event()

    async def command() -> None:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(30)
        finally:
            cleaned.set()

    with pytest.raises(SystemExit) as exited:
        await stopped_by_sigterm(command())
    assert exited.value.code == 143
    assert cleaned.is_set()
    # The handler is gone with the command: SIGTERM is back to what it was.
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


async def test_a_cancellation_that_is_not_sigterm_stays_a_cancellation() -> None:
    task = asyncio.create_task(stopped_by_sigterm(asyncio.sleep(30)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_the_command_s_result_comes_back() -> None:
    async def command() -> int:
        return 7

    assert await stopped_by_sigterm(command()) == 7
