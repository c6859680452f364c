"""Process entry-point plumbing shared by the orchestrator and the workers.

Runs a service coroutine on uvloop, with logging configured once, and turns SIGTERM/SIGINT into a
``stop`` event the service awaits, so it can drain instead of dying mid-request.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

import uvloop

T = TypeVar("T")


def configure_logging(level: str) -> None:
    """One-line-per-record logs to stderr; never logs settings values (URLs may hold secrets)."""
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def run_service(service: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``service(stop)`` on uvloop until it returns; ``stop`` is set on SIGTERM or SIGINT."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await service(stop)

    uvloop.run(main())


async def stopped_by_sigterm(main: Awaitable[T]) -> T:
    """Await ``main``, cancelling it on SIGTERM as asyncio cancels it on Ctrl-C, so that what it
    started (stacks, servers, generator processes) stops through its context managers instead of
    outliving it; the process then exits with status 143 (128 + SIGTERM)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None, "stopped_by_sigterm runs inside a task"
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        return await main
    except asyncio.CancelledError:
        if terminated:
            raise SystemExit(128 + signal.SIGTERM) from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def freeze_heap() -> None:
    """Move everything allocated so far (modules, models, sessions) out of the GC's reach.

    Called once after warm-up: later collections then scan only request-time objects, which
    shortens the pauses that land on the latency tail.
    """
    gc.collect()
    gc.freeze()
