"""Restarting the local stack's processes when they exit on their own.

:class:`ChildSupervisor` watches every child it is given (Redis, NATS, Triton, screening workers,
orchestrator processes: anything :class:`Restartable`) with one owned task each. When a child
exits and nobody asked it to (its ``stopping`` is False), the supervisor logs the child's name and
exit status, waits a backoff (:class:`Backoff`: exponential, capped, reset once the child stayed
up a while), and restarts it on the same ports (the other processes connect to fixed URLs), until
it is ready again; a failed restart backs off further and tries again. Leaving the ``async with``
block cancels the watch tasks before anyone stops the children, so a shutdown never triggers a
restart.

Every restart is counted (:attr:`ChildSupervisor.restarts`, by child name, and the Prometheus
counter ``cascade_stack_restarts_total{child}`` in :data:`STACK_METRICS`, which ``cascade up
--supervisor-metrics-port`` serves) and recorded as a :class:`RestartEvent`, which ``on_event``
(``cascade up`` prints them) receives too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, Self

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as MetricCounter

from devstack.servers import ServerError

__all__ = ["STACK_METRICS", "Backoff", "ChildSupervisor", "RestartEvent", "Restartable"]

STACK_METRICS = CollectorRegistry()
"""The supervisor's own metrics, apart from the services' (each serves its own /metrics)."""
RESTARTS = MetricCounter(
    "cascade_stack_restarts",
    "Processes of the local stack restarted after they exited on their own.",
    ["child"],
    registry=STACK_METRICS,
)

logger = logging.getLogger(__name__)


class Restartable(Protocol):
    """A started child process the supervisor can watch and start again."""

    @property
    def name(self) -> str:
        """How logs and counters name it."""
        ...

    @property
    def stopping(self) -> bool:
        """True once it was stopped on purpose (never restarted then)."""
        ...

    async def wait(self) -> int:
        """Wait until the current process exits; its exit status."""
        ...

    async def restart(self) -> None:
        """Start it again on the same ports; return once it is ready (``ServerError`` if not)."""
        ...


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before restart number ``n`` of a child (0-based, since it last stayed up)."""

    initial_s: float = 0.2
    factor: float = 2.0
    max_s: float = 10.0
    reset_after_s: float = 30.0
    """A child that stayed up this long starts again from ``initial_s`` when it next exits."""

    def __post_init__(self) -> None:
        if self.initial_s < 0 or self.max_s < self.initial_s or self.factor < 1:
            raise ValueError("need 0 <= initial_s <= max_s and factor >= 1")

    def delay_s(self, attempt: int) -> float:
        """``initial_s * factor**attempt``, at most ``max_s``."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        delay_s = self.initial_s
        for _ in range(attempt):  # multiplied step by step: factor**attempt could overflow
            delay_s *= self.factor
            if delay_s >= self.max_s:
                return self.max_s
        return delay_s


@dataclass(frozen=True, slots=True)
class RestartEvent:
    """One unexpected exit of a child and what the supervisor did about it."""

    child: str
    exit_status: int
    restart_number: int
    """The child's restarts so far, this one included."""
    delay_s: float
    ready_at: float | None = None
    """``time.monotonic()`` when the restarted child was ready; None if the restart failed."""
    error: str = ""


@dataclass(slots=True)
class _Watch:
    child: Restartable
    task: asyncio.Task[None] | None = None
    attempt: int = 0


@dataclass(slots=True)
class ChildSupervisor:
    """Restarts ``children`` that exit unexpectedly while the ``async with`` block runs."""

    children: Sequence[Restartable]
    backoff: Backoff = field(default_factory=Backoff)
    on_event: Callable[[RestartEvent], None] | None = None
    restarts: Counter[str] = field(default_factory=Counter)
    """Restarts per child name (attempts, failed ones included)."""
    events: list[RestartEvent] = field(default_factory=list)
    _watches: list[_Watch] = field(default_factory=list)

    async def __aenter__(self) -> Self:
        for child in self.children:
            watch = _Watch(child)
            watch.task = asyncio.create_task(self._watch(watch), name=f"supervise-{child.name}")
            self._watches.append(watch)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tasks = [w.task for w in self._watches if w.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._watches.clear()

    @property
    def total_restarts(self) -> int:
        """Restarts of every child together."""
        return sum(self.restarts.values())

    async def _watch(self, watch: _Watch) -> None:
        child = watch.child
        up_since = time.monotonic()
        while True:
            status = await child.wait()
            if child.stopping:
                return
            if time.monotonic() - up_since >= self.backoff.reset_after_s:
                watch.attempt = 0
            while not await self._restart(watch, status):
                if child.stopping:
                    return
                status = await child.wait()  # returns at once: the failed start was reaped
            up_since = time.monotonic()

    async def _restart(self, watch: _Watch, status: int) -> bool:
        """One restart of ``watch.child`` after it exited with ``status``; True when ready."""
        child = watch.child
        delay_s = self.backoff.delay_s(watch.attempt)
        watch.attempt += 1
        self.restarts[child.name] += 1
        RESTARTS.labels(child.name).inc()
        number = self.restarts[child.name]
        logger.warning(
            "%s exited unexpectedly with status %s; restart #%d in %.2f s",
            child.name,
            status,
            number,
            delay_s,
        )
        await asyncio.sleep(delay_s)
        if child.stopping:
            return False
        started = time.monotonic()
        try:
            await child.restart()
        except ServerError as exc:
            error = str(exc).splitlines()[0]
            logger.error("%s: restart #%d failed: %s", child.name, number, error)
            self._record(RestartEvent(child.name, status, number, delay_s, None, error))
            return False
        except Exception as exc:  # e.g. the executable vanished: keep watching, back off
            error = repr(exc)
            logger.exception("%s: restart #%d failed", child.name, number)
            self._record(RestartEvent(child.name, status, number, delay_s, None, error))
            return False
        ready_at = time.monotonic()
        logger.warning(
            "%s restarted (#%d), ready after %.2f s", child.name, number, ready_at - started
        )
        self._record(RestartEvent(child.name, status, number, delay_s, ready_at))
        return True

    def _record(self, event: RestartEvent) -> None:
        self.events.append(event)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # a reporting callback must not stop the supervision
                logger.exception("restart event callback failed")
