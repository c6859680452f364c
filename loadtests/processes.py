"""Running one step of load from one or several generator processes, with a shared start.

One Python process with one event loop tops out at a few thousand calls per second, and on a
2-core machine it competes with the stack it measures; past that, ``processes > 1`` spreads the
rate over spawned processes, each with its own uvloop loop and gRPC channel(s), each sending its
own :class:`~loadtests.replay.RequestPlan`.

Start is synchronised: every child connects, reports ready, then waits for a wall-clock start
time the parent publishes, and converts it to its own monotonic clock. Each child copies its
running counts into a shared array a few times a second (for the progress line) and sends its
:class:`~loadtests.results.Tally` back when done; the parent merges them.

:class:`GeneratorProcesses` is the async context manager that owns the children: whatever
happens, they are terminated and joined on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.sharedctypes
import queue
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

from loadtests.client import ScoringClient, Sleep, quiet_collector, run_open_loop
from loadtests.precise_timer import PreciseTimer, precise_timer_available
from loadtests.replay import RequestPlan
from loadtests.results import Tally

__all__ = ["COUNTER_FIELDS", "GeneratorProcesses", "ShareJob", "run_share_here"]

logger = logging.getLogger(__name__)

COUNTER_FIELDS: Final = ("scheduled", "sent", "ok", "errors", "timeouts", "unsent")
_PUBLISH_EVERY_S: Final = 0.2
_START_LEAD_S: Final = 0.25
_READY_TIMEOUT_S: Final = 90.0
_RESULT_SLACK_S: Final = 30.0


@dataclass(frozen=True, slots=True)
class ShareJob:
    """Everything one generator process needs for its share of a step (picklable)."""

    index: int
    target: str
    channels: int
    plan: RequestPlan
    window_s: float
    deadline_s: float
    budget_us: int
    late_after_us: int | None = None


def _publish(tally: Tally, counters: Any, index: int) -> None:
    base = index * len(COUNTER_FIELDS)
    for offset, name in enumerate(COUNTER_FIELDS):
        counters[base + offset] = getattr(tally, name)


async def _publisher(tally: Tally, counters: Any, index: int) -> None:
    while True:
        _publish(tally, counters, index)
        await asyncio.sleep(_PUBLISH_EVERY_S)


async def run_share_here(
    job: ShareJob,
    tally: Tally,
    *,
    start_at: float | None = None,
    client: ScoringClient | None = None,
) -> None:
    """Run ``job`` in this process's running loop (connecting first unless given ``client``).

    Without ``start_at`` it starts ``_START_LEAD_S`` from now, after freezing the heap; a caller
    that fixes ``start_at`` itself freezes the heap before that (see :func:`quiet_collector`).
    """
    if client is None:
        async with ScoringClient(job.target, channels=job.channels) as own:
            await run_share_here(job, tally, start_at=start_at, client=own)
        return
    async with contextlib.AsyncExitStack() as stack:
        sleep: Sleep = asyncio.sleep
        if precise_timer_available():
            sleep = (await stack.enter_async_context(PreciseTimer())).sleep
        if start_at is None:
            stack.enter_context(quiet_collector())
            start_at = time.perf_counter() + _START_LEAD_S
        await run_open_loop(
            client.send,
            job.plan,
            tally,
            start_at=start_at,
            window_s=job.window_s,
            deadline_s=job.deadline_s,
            sleep=sleep,
        )


async def _child(job: ShareJob, events: Any, go: Any, start_wall: Any, counters: Any) -> Tally:
    tally = Tally(budget_us=job.budget_us, late_after_us=job.late_after_us)
    async with ScoringClient(job.target, channels=job.channels) as client:
        with quiet_collector():  # before "ready": the start time is fixed after it
            events.put(("ready", job.index, None))
            await asyncio.to_thread(go.wait)
            start_at = time.perf_counter() + (start_wall.value - time.time())
            publisher = asyncio.create_task(
                _publisher(tally, counters, job.index), name=f"counters-{job.index}"
            )
            try:
                await run_share_here(job, tally, start_at=start_at, client=client)
            finally:
                publisher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await publisher
                _publish(tally, counters, job.index)
    return tally


def _child_main(job: ShareJob, events: Any, go: Any, start_wall: Any, counters: Any) -> None:
    """Entry point of a spawned generator process."""
    import uvloop

    try:
        tally = uvloop.run(_child(job, events, go, start_wall, counters))
    except BaseException:
        events.put(("failed", job.index, traceback.format_exc()))
        raise
    events.put(("result", job.index, tally))


class GeneratorProcesses:
    """Spawned generator processes for one step; an async context manager that always reaps.

    ``counters`` (shared, ``len(jobs) * len(COUNTER_FIELDS)`` int64) shows live progress.
    """

    def __init__(self, jobs: Sequence[ShareJob], *, budget_us: int) -> None:
        if not jobs:
            raise ValueError("at least one job")
        self._jobs = list(jobs)
        self._budget_us = budget_us
        self._ctx = multiprocessing.get_context("spawn")
        self.counters: Any = self._ctx.Array("q", len(jobs) * len(COUNTER_FIELDS), lock=False)
        self._events: Any = self._ctx.Queue()
        self._go: Any = self._ctx.Event()
        self._start_wall: Any = self._ctx.Value("d", 0.0, lock=False)
        self._procs: list[multiprocessing.process.BaseProcess] = []

    async def __aenter__(self) -> GeneratorProcesses:
        for job in self._jobs:
            proc = self._ctx.Process(
                target=_child_main,
                args=(job, self._events, self._go, self._start_wall, self.counters),
                name=f"loadgen-{job.index}",
                daemon=True,
            )
            proc.start()
            self._procs.append(proc)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._go.set()  # never leave a child waiting for a start that will not come
        for proc in self._procs:
            await asyncio.to_thread(proc.join, 5.0)
            if proc.is_alive():
                logger.warning("generator process %s did not exit; terminating it", proc.name)
                proc.terminate()
                await asyncio.to_thread(proc.join, 5.0)
        self._events.close()
        self._events.join_thread()

    async def _next_event(self, timeout_s: float) -> tuple[str, int, Any]:
        try:
            event: tuple[str, int, Any] = await asyncio.to_thread(self._events.get, True, timeout_s)
        except queue.Empty:
            raise TimeoutError(
                f"no word from the generator processes in {timeout_s:.0f} s"
            ) from None
        if event[0] == "failed":
            raise RuntimeError(f"generator process {event[1]} failed:\n{event[2]}")
        return event

    async def run(self) -> Tally:
        """Wait until every child is connected, start them together, merge their tallies."""
        ready = 0
        while ready < len(self._jobs):
            kind, _, _ = await self._next_event(_READY_TIMEOUT_S)
            ready += kind == "ready"
        self._start_wall.value = time.time() + _START_LEAD_S
        self._go.set()
        total = Tally(budget_us=self._budget_us, late_after_us=self._jobs[0].late_after_us)
        window_s = max(job.window_s + job.deadline_s for job in self._jobs)
        results = 0
        while results < len(self._jobs):
            kind, _, payload = await self._next_event(window_s + _RESULT_SLACK_S)
            if kind == "result":
                total.merge(payload)
                results += 1
        return total

    def progress(self) -> dict[str, int]:
        """The children's counts as last published, summed."""
        sums = dict.fromkeys(COUNTER_FIELDS, 0)
        width = len(COUNTER_FIELDS)
        for index in range(len(self._jobs)):
            for offset, name in enumerate(COUNTER_FIELDS):
                sums[name] += int(self.counters[index * width + offset])
        return sums
