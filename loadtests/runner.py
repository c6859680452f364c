"""Steps and sweeps against one target: warm-up, the serial step, open-loop steps, the sweep.

:class:`TargetRunner` is an async context manager holding one persistent :class:`ScoringClient`
(for the serial step, warm-up and single-process steps) and its own
:class:`~loadtests.replay.ReplayStream`; give two runners streams over the same base transactions
and they send the same workload, which is what makes the cascade and the naive baseline
comparable. Each step returns its report dict (:func:`loadtests.report.step_report`).

Before warm-up a runner can backfill card histories into its target (:meth:`TargetRunner.backfill`);
after the steps, :meth:`TargetRunner.overload_step` runs one open-loop step past capacity and keeps
it apart from the sweep's steps (:attr:`TargetRunner.overload`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final

import grpc

from cascade.cpu_latency import CpuLatencyHold
from cascade.transaction import Transaction
from loadtests.backfill import backfill
from loadtests.client import ScoringClient, run_serial
from loadtests.cpu import CpuMeter, CpuSnapshot, cpu_report
from loadtests.histogram import Histogram
from loadtests.history import history_summary
from loadtests.processes import COUNTER_FIELDS, GeneratorProcesses, ShareJob, run_share_here
from loadtests.progress import ProgressLine
from loadtests.replay import ReplayStream, plan_requests
from loadtests.report import (
    Criteria,
    SweepPlan,
    SweepPoint,
    next_sweep_rate,
    overload_summary,
    step_report,
    summarize,
)
from loadtests.results import Tally
from loadtests.schedule import Arrivals, ScheduleSpec, schedule_offsets, window_s

__all__ = ["LoadSettings", "TargetRunner"]

logger = logging.getLogger(__name__)

_SETTLE_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class LoadSettings:
    """How load is generated; shared by every target of a run."""

    rate_per_s: float = 500.0
    duration_s: float = 10.0
    max_count: int | None = None
    arrivals: Arrivals = Arrivals.POISSON
    repeat_share: float = 0.1
    processes: int = 1
    channels: int = 1
    deadline_ms: float = 50.0
    late_grace_ms: float = 2.0  # an answer later than deadline + this counts as late
    criteria: Criteria = field(default_factory=Criteria)
    warmup_s: float = 2.0
    warmup_rate: float = 100.0
    serial_count: int = 1000
    serial_duration_s: float = 10.0
    seed: int = 1
    progress: bool | None = None  # None: only when stderr is a terminal

    def __post_init__(self) -> None:
        if self.processes < 1 or self.channels < 1:
            raise ValueError("processes and channels must be >= 1")
        if not 0.0 <= self.repeat_share <= 1.0:
            raise ValueError("repeat_share must be within 0..1")
        if self.deadline_ms <= 0:
            raise ValueError("deadline_ms must be > 0")

    @property
    def budget_us(self) -> int:
        """The SLO budget in microseconds."""
        return round(self.criteria.budget_ms * 1000)

    @property
    def late_after_us(self) -> int:
        """Client-measured service time beyond which an answer is late, in microseconds."""
        return round((self.deadline_ms + self.late_grace_ms) * 1000)

    def tally(self) -> Tally:
        """An empty tally for one step."""
        return Tally(budget_us=self.budget_us, late_after_us=self.late_after_us)


def sweep_point(report: Mapping[str, Any]) -> SweepPoint:
    """What the sweep needs from a step report."""
    return SweepPoint(
        rate=float(report["offered_rate"]),
        passed=bool(report["passed"]),
        saturated=bool(report["saturation_reasons"]),
    )


def _tally_counts(tally: Tally) -> Callable[[], Mapping[str, int]]:
    return lambda: {name: int(getattr(tally, name)) for name in COUNTER_FIELDS}


class TargetRunner:
    """Runs steps against one target (``name`` labels them in the report)."""

    def __init__(
        self,
        name: str,
        target: str,
        stream: ReplayStream,
        settings: LoadSettings,
        *,
        cpu_meter: CpuMeter | None = None,
        stack_roles: Collection[str] | None = None,
        cpu_latency_us: int | None = None,
    ) -> None:
        self.name = name
        self._cpu_latency_us = cpu_latency_us
        self._cpu_meter = cpu_meter
        self._stack_roles = stack_roles
        self.target = target
        self._stream = stream
        self._settings = settings
        self._client = ScoringClient(target, channels=settings.channels)
        self.steps: list[dict[str, Any]] = []
        self.serial: dict[str, Any] | None = None
        self.overload: dict[str, Any] | None = None
        self.backfilled: dict[str, Any] | None = None

    async def __aenter__(self) -> TargetRunner:
        await self._client.__aenter__()
        return self

    @contextlib.contextmanager
    def _awake(self) -> Iterator[None]:
        """With ``cpu_latency_us``, the cores are kept from deep idle while the step runs
        (:class:`~cascade.cpu_latency.CpuLatencyHold`); else nothing."""
        if self._cpu_latency_us is None:
            yield
            return
        with CpuLatencyHold(self._cpu_latency_us) as hold:
            if not hold.held:
                raise RuntimeError(f"{self.name}: cores cannot be kept awake: {hold.problem}")
            yield

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._client.__aexit__(exc_type, exc, tb)

    def _seed(self, rate: float, label: str) -> int:
        # The same step (rate and label) gets the same seed on every target: same arrivals.
        return zlib.crc32(f"{self._settings.seed}:{rate:.3f}:{label}".encode())

    @property
    def history_seen(self) -> dict[str, Any]:
        """History lengths the load's fresh transactions met (as planned), summarized."""
        return history_summary(self._stream.history_lengths)

    async def backfill(self, batches: Sequence[Sequence[Transaction]], *, nonce: str) -> None:
        """Send earlier transactions of the load's cards with ``ScoreBatch`` (see
        :mod:`loadtests.backfill`); recorded in :attr:`backfilled`."""
        self.backfilled = await backfill(self._client, batches, nonce=nonce)

    async def overload_step(self, rate: float, duration_s: float) -> dict[str, Any]:
        """One open-loop step at ``rate`` past capacity; recorded in :attr:`overload` with its
        :func:`~loadtests.report.overload_summary`, not among the sweep's steps."""
        s = self._settings
        report = await self._open_step(
            rate, duration_s, label=f"{self.name} overload @{rate:g}/s", processes=s.processes
        )
        report["mode"] = "overload"
        report["summary"] = overload_summary(report)
        self.overload = report
        await asyncio.sleep(_SETTLE_S)
        return report

    async def warmup(self) -> None:
        """A short open-loop step at a low rate whose numbers are thrown away."""
        s = self._settings
        if s.warmup_s <= 0:
            return
        with self._awake():
            await self._open_step(s.warmup_rate, s.warmup_s, label="warm-up", processes=1)
        await asyncio.sleep(_SETTLE_S)

    async def run_serial(self) -> dict[str, Any] | None:
        """Closed loop, one call in flight, no repeats: the unloaded latency per path."""
        s = self._settings
        if s.serial_count <= 0:
            return None
        payloads = plan_requests(
            [
                schedule_offsets(
                    ScheduleSpec(1000.0, s.serial_count / 1000.0, s.serial_count, Arrivals.CONSTANT)
                )
            ],
            self._stream,
            repeat_share=0.0,
        )[0].payloads
        tally = s.tally()
        label = f"{self.name} serial"
        with self._awake():
            cpu_before, started = await self._cpu_snapshot(), time.monotonic()
            async with ProgressLine(
                label, s.serial_duration_s, _tally_counts(tally), enabled=s.progress
            ):
                await run_serial(
                    self._client.send,
                    payloads,
                    tally,
                    duration_s=s.serial_duration_s,
                    deadline_s=s.deadline_ms / 1000,
                )
            span = max(tally.last_done_s, 1e-9)
            self.serial = step_report(
                tally,
                label=label,
                mode="serial",
                arrivals="closed-loop",
                offered_rate=tally.ok / span,
                window_s=span,
                processes=1,
                criteria=s.criteria,
            )
            await self._add_cpu(self.serial, cpu_before, started, tally.ok)
            self.serial["grpc_floor_ms"] = await self._grpc_floor(min(s.serial_count, 500))
        self.serial["cpu_latency_us"] = self._cpu_latency_us
        await asyncio.sleep(_SETTLE_S)
        return self.serial

    async def _grpc_floor(self, count: int) -> dict[str, float] | None:
        """Health checks one at a time: what any call to this server costs from this client."""
        hist = Histogram()
        try:
            for _ in range(count):
                start = time.perf_counter()
                await self._client.health_check()
                hist.record(round((time.perf_counter() - start) * 1e6))
        except grpc.aio.AioRpcError as exc:
            logger.warning("%s: no health service to measure the gRPC floor (%s)", self.name, exc)
            return None
        return summarize(hist)

    async def step(self, rate: float, duration_s: float | None = None) -> dict[str, Any]:
        """One open-loop step at ``rate``; recorded in :attr:`steps`."""
        s = self._settings
        report = await self._open_step(
            rate,
            duration_s or s.duration_s,
            label=f"{self.name} @{rate:g}/s",
            processes=s.processes,
        )
        self.steps.append(report)
        await asyncio.sleep(_SETTLE_S)
        return report

    async def sweep(self, plan: SweepPlan) -> list[dict[str, Any]]:
        """Steps chosen by :func:`~loadtests.report.next_sweep_rate` until it says stop."""
        done: list[SweepPoint] = []
        while (rate := next_sweep_rate(done, plan)) is not None:
            report = await self.step(rate)
            done.append(sweep_point(report))
            logger.info(
                "%s: %s", report["label"], "pass" if report["passed"] else report["fail_reasons"]
            )
        return self.steps

    async def _open_step(
        self, rate: float, duration_s: float, *, label: str, processes: int
    ) -> dict[str, Any]:
        s = self._settings
        spec = ScheduleSpec(
            rate_per_s=rate,
            duration_s=duration_s,
            max_count=s.max_count,
            arrivals=s.arrivals,
            seed=self._seed(rate, label.split(" ", 1)[-1]),
        )
        parts = [schedule_offsets(spec, parts=processes, index=k) for k in range(processes)]
        plans = plan_requests(parts, self._stream, repeat_share=s.repeat_share, seed=spec.seed)
        window = window_s(spec)
        jobs = [
            ShareJob(
                index=k,
                target=self.target,
                channels=s.channels,
                plan=plan,
                window_s=window,
                deadline_s=s.deadline_ms / 1000,
                budget_us=s.budget_us,
                late_after_us=s.late_after_us,
            )
            for k, plan in enumerate(plans)
        ]
        with self._awake():
            cpu_before, started = await self._cpu_snapshot(), time.monotonic()
            if processes == 1:
                tally = s.tally()
                async with ProgressLine(label, window, _tally_counts(tally), enabled=s.progress):
                    await run_share_here(jobs[0], tally, client=self._client)
            else:
                async with (
                    GeneratorProcesses(jobs, budget_us=s.budget_us) as children,
                    ProgressLine(label, window, children.progress, enabled=s.progress),
                ):
                    tally = await children.run()
            report = step_report(
                tally,
                label=label,
                mode="open",
                arrivals=str(s.arrivals),
                offered_rate=rate,
                window_s=window,
                processes=processes,
                criteria=s.criteria,
            )
            await self._add_cpu(report, cpu_before, started, tally.ok)
        report["cpu_latency_us"] = self._cpu_latency_us  # None: the machine as it is
        return report

    async def _cpu_snapshot(self) -> CpuSnapshot:
        if self._cpu_meter is None:
            return CpuSnapshot()
        return await asyncio.to_thread(self._cpu_meter.snapshot)

    async def _add_cpu(
        self, report: dict[str, Any], before: CpuSnapshot, started: float, answers: int
    ) -> None:
        """CPU by component during the step (spawned generators included once reaped)."""
        if self._cpu_meter is None:
            return
        after = await self._cpu_snapshot()
        report["cpu"] = cpu_report(
            before, after, time.monotonic() - started, answers, stack_roles=self._stack_roles
        )
