"""Stopping a task that loses a cancellation, and a NATS connect cut short by a timeout.

The stand-in below loses the first cancellation the way Python 3.11's ``asyncio.wait_for`` can
inside nats-py (the cancellation lands in the loop turn that completes the awaited read) and
then goes on retrying, as nats-py's connect does against a server that refuses the login.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cascade.lifecycle import RECANCEL_S, cancel_and_wait, stop_task
from cascade.nats_connection import connect_nats

HANG_S = 2.0
"""Where a test stops waiting and fails: far past anything these should take."""


async def retrying_that_loses_one_cancellation(lost: list[int]) -> None:
    while True:
        try:
            await asyncio.sleep(0.005)
        except asyncio.CancelledError:
            if not lost:
                lost.append(1)
                continue  # what wait_for does when the read completed in the same turn
            raise


async def ends_within(awaitable: Any, within_s: float = HANG_S) -> BaseException | None:
    """Run ``awaitable`` in a task of its own; what it raised, or fail if it is still running
    after ``within_s`` (measured with asyncio.wait, which no lost cancellation can defeat)."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=within_s)
    if not done:
        task.cancel()
        pytest.fail(f"still running after {within_s} s")
    return asyncio.CancelledError() if task.cancelled() else task.exception()


async def test_stop_task_cancels_again_until_the_task_has_ended() -> None:
    lost: list[int] = []
    task = asyncio.create_task(retrying_that_loses_one_cancellation(lost))
    await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await stop_task(task) is True
    assert lost == [1] and task.cancelled()
    # One lost cancellation costs one resend interval, not the whole allowance.
    assert loop.time() - started < RECANCEL_S * 4


async def test_stop_task_gives_up_after_its_allowance_and_says_so() -> None:
    released = asyncio.Event()

    async def deaf_until_released() -> None:
        while not released.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(deaf_until_released())
    await asyncio.sleep(0)
    assert await stop_task(task, within_s=0.2) is False
    assert not task.done()
    released.set()
    assert await ends_within(task) is None


async def test_stop_task_lets_the_task_finish_within_its_grace() -> None:
    async def finishes() -> str:
        await asyncio.sleep(0.02)
        return "done"

    task = asyncio.create_task(finishes())
    assert await stop_task(task, grace_s=1.0) is True
    assert task.result() == "done"  # ended on its own, not cancelled


async def test_the_callers_cancellation_is_raised_once_the_task_has_ended() -> None:
    lost: list[int] = []
    task = asyncio.create_task(retrying_that_loses_one_cancellation(lost))
    await asyncio.sleep(0.01)
    stopping = asyncio.create_task(stop_task(task, grace_s=0.05))
    await asyncio.sleep(0.01)
    stopping.cancel()  # the caller is cut short while it waits out the grace
    error = await ends_within(stopping)
    assert isinstance(error, asyncio.CancelledError)
    assert task.done() and lost == [1]


async def test_cancel_and_wait_cancels_again_until_the_task_has_ended() -> None:
    lost: list[int] = []
    task = asyncio.create_task(retrying_that_loses_one_cancellation(lost))
    await asyncio.sleep(0.01)
    # A single cancel() and await (what this did before) would wait here for ever.
    assert await ends_within(cancel_and_wait(task)) is None
    assert lost == [1] and task.cancelled()


async def test_cancel_and_wait_logs_the_error_a_task_ended_with_and_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fails() -> None:
        raise RuntimeError("refresh failed")

    task = asyncio.create_task(fails(), name="refresher")
    await asyncio.sleep(0)
    assert await ends_within(cancel_and_wait(task)) is None
    assert any(
        r.levelname == "WARNING" and "refresher" in r.message and "refresh failed" in r.message
        for r in caplog.records
    )
    await cancel_and_wait(None)  # nothing to stop


async def test_a_connect_cut_short_by_a_timeout_returns_even_if_it_lost_the_cancellation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lost: list[int] = []
    closed: list[int] = []

    async def connect(self: object, **options: object) -> None:
        await retrying_that_loses_one_cancellation(lost)

    async def close(self: object) -> None:
        closed.append(1)

    monkeypatch.setattr("cascade.nats_connection.NatsClient.connect", connect)
    monkeypatch.setattr("cascade.nats_connection.NatsClient.close", close)

    async def connect_within(timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            await connect_nats("nats://127.0.0.1:1", name="test")

    error = await ends_within(connect_within(0.05))
    assert isinstance(error, TimeoutError)
    assert lost == [1], "the stand-in did lose the first cancellation"
    assert closed == [1], "the half-open client is closed"
