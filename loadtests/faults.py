"""``python -m loadtests.faults``: the fault matrix, under open-loop load on the local stack.

Starts a :class:`devstack.stack.LocalStack` (its supervisor restarts what is killed), then runs one
phase after the other at ``--rate`` (default 100/s) with the load generator's open loop
(:func:`loadtests.client.run_open_loop`): baseline; SIGSTOP then SIGCONT one worker, all workers,
Redis, NATS, Triton; SIGKILL one worker; SIGKILL Triton (:data:`loadtests.fault_matrix.PHASES`).
Each phase: ``--pre`` seconds of load, the fault (``--fault`` seconds stopped, or a kill and its
restart, within ``--kill-wait``), ``--post`` seconds more. Between phases it waits until the stack
answers cleanly again. Writes ``faults.json`` and ``faults.md`` into ``--out`` and prints the
table. Usage::

    python -m loadtests.faults --out .run/faults                       # every phase
    python -m loadtests.faults --phases baseline,sigkill-triton --rate 200
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import shlex
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, Protocol

from cascade.runtime import stopped_by_sigterm
from cascade.settings import DEFAULT_MODEL_DIR, REPO_ROOT
from cascade.v1 import scoring_pb2
from cascade.wire import to_wire
from devstack.stack import LocalStack, StackConfig, StackPorts
from devstack.stack_settings import parse_assignments
from devstack.supervision import ChildSupervisor, RestartEvent
from loadtests.cli import git_commit
from loadtests.client import ScoringClient, run_open_loop
from loadtests.cpu import process_cpu_s
from loadtests.fault_matrix import (
    FaultKind,
    PhaseSpec,
    PhaseTiming,
    Target,
    Timeline,
    markdown_table,
    parse_phases,
    phase_summary,
)
from loadtests.replay import ReplayStream, load_transactions, plan_requests
from loadtests.results import Tally
from loadtests.schedule import Arrivals, ScheduleSpec, schedule_offsets

__all__ = ["main", "run_matrix"]

logger = logging.getLogger(__name__)

_START_LEAD_S: Final = 0.05
_SETTLE_TIMEOUT_S: Final = 60.0
_LATE_GRACE_MS: Final = 2.0


class _Process(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def pid(self) -> int | None: ...


def _pids(stack: LocalStack, target: Target) -> list[tuple[str, int]]:
    """(name, pid) of the processes ``target`` names, as they run now."""
    processes: Sequence[_Process | None]
    if target is Target.ONE_WORKER:
        # The busiest one: with hedging.routing=pack the orchestrator keeps to its preferred
        # worker, and stopping the idle spare would test nothing.
        processes = sorted(stack.workers, key=_cpu_so_far, reverse=True)[:1]
    elif target is Target.ALL_WORKERS:
        processes = stack.workers
    elif target is Target.REDIS:
        processes = [stack.redis]
    elif target is Target.NATS:
        processes = [stack.nats]
    elif target is Target.TRITON:
        processes = [stack.triton]
    else:
        processes = []
    found = [(p.name, p.pid) for p in processes if p is not None and p.pid is not None]
    if len(found) != len(processes):
        raise RuntimeError(f"{target}: not every process is running")
    return found


def _cpu_so_far(process: _Process) -> float:
    return process_cpu_s(process.pid) if process.pid is not None else 0.0


def _signal_groups(pids: Sequence[tuple[str, int]], sig: signal.Signals) -> None:
    # Each server leads its own process group: Triton's backend stubs stop with it.
    for _, pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)


class _Phase:
    """One phase's fault, applied on the load's clock; records when it started and ended."""

    def __init__(
        self, spec: PhaseSpec, stack: LocalStack, timing: PhaseTiming, start_at: float
    ) -> None:
        self.spec = spec
        self._stack = stack
        self._timing = timing
        self._start_at = start_at
        self.fault_at_s: float | None = None
        self.fault_end_s: float | None = None

    def _now_s(self) -> float:
        return time.monotonic() - self._start_at

    async def inject(self) -> None:
        """Wait ``pre_s``, do the fault, note its end."""
        spec = self.spec
        if spec.kind is FaultKind.NONE:
            return
        await asyncio.sleep(max(0.0, self._timing.pre_s - self._now_s()))
        pids = _pids(self._stack, spec.target)
        if spec.kind is FaultKind.STOP:
            self.fault_at_s = self._now_s()
            _signal_groups(pids, signal.SIGSTOP)
            try:
                await asyncio.sleep(self._timing.fault_s)
            finally:
                _signal_groups(pids, signal.SIGCONT)
            self.fault_end_s = self._now_s()
            return
        supervisor = self._supervisor()
        since = len(supervisor.events)
        self.fault_at_s = self._now_s()
        for _, pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        names = {name for name, _ in pids}
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._timing.kill_wait_s):
                while True:  # polled: the supervisor records restarts as they happen
                    back = [e for e in supervisor.events[since:] if e.ready_at is not None]
                    if names <= {e.child for e in back}:
                        ready_at = max(e.ready_at for e in back if e.ready_at is not None)
                        self.fault_end_s = ready_at - self._start_at
                        return
                    await asyncio.sleep(0.01)

    def _supervisor(self) -> ChildSupervisor:
        if self._stack.supervisor is None:
            raise RuntimeError("kill phases need the stack's supervisor")
        return self._stack.supervisor


async def _run_phase(
    spec: PhaseSpec,
    stack: LocalStack,
    client: ScoringClient,
    stream: ReplayStream,
    args: argparse.Namespace,
    timing: PhaseTiming,
    seed: int,
) -> dict[str, Any]:
    deadline_s = args.deadline_ms / 1000
    late_after_s = (args.deadline_ms + _LATE_GRACE_MS) / 1000
    window_s = timing.window_s(spec.kind)
    offsets = schedule_offsets(
        ScheduleSpec(args.rate, window_s, arrivals=Arrivals(args.arrivals), seed=seed)
    )
    (plan,) = plan_requests([offsets], stream, repeat_share=args.repeat_share, seed=seed)
    tally = Tally(budget_us=round(args.deadline_ms * 1000), late_after_us=round(late_after_s * 1e6))
    timeline = Timeline(late_after_s=late_after_s)
    start_at = time.monotonic() + _START_LEAD_S

    async def send(payload: bytes, timeout_s: float) -> scoring_pb2.ScoreResponse:
        sent_s = time.monotonic() - start_at
        try:
            reply = await client.send(payload, timeout_s)
        except BaseException:
            timeline.record(sent_s, time.monotonic() - start_at, None)
            raise
        timeline.record(sent_s, time.monotonic() - start_at, reply)
        return reply

    supervisor = stack.supervisor
    restarts_before = Counter(supervisor.restarts) if supervisor is not None else Counter()
    phase = _Phase(spec, stack, timing, start_at)
    await asyncio.gather(
        run_open_loop(
            send,
            plan,
            tally,
            start_at=start_at,
            window_s=window_s,
            deadline_s=deadline_s,
            clock=time.monotonic,
        ),
        phase.inject(),
    )
    restarts = (Counter(supervisor.restarts) - restarts_before) if supervisor else Counter()
    return phase_summary(
        spec,
        tally,
        timeline,
        window_s=window_s,
        fault_at_s=phase.fault_at_s,
        fault_end_s=phase.fault_end_s,
        restarts=restarts,
    )


async def _settle(client: ScoringClient, stream: ReplayStream, deadline_s: float) -> None:
    """Wait until five answers in a row come back clean (the stack recovered from the phase)."""
    async with asyncio.timeout(_SETTLE_TIMEOUT_S):
        clean = 0
        while clean < 5:
            request = scoring_pb2.ScoreRequest(transaction=to_wire(stream.next()))
            try:
                reply = await client.send(request.SerializeToString(), deadline_s)
                clean = clean + 1 if not reply.reasons else 0
            except Exception:  # the stack may still be coming back
                clean = 0
            await asyncio.sleep(0.05)


async def run_matrix(args: argparse.Namespace, phases: Sequence[PhaseSpec]) -> dict[str, Any]:
    """Start the stack, run ``phases`` in order, return the report."""
    timing = PhaseTiming(args.pre, args.fault, args.post, args.kill_wait)
    out_dir: Path = args.out.resolve()
    base = load_transactions(args.source, count=max(2000, int(args.rate * 60)), seed=args.seed)
    stream = ReplayStream(base, nonce=secrets.token_hex(3))
    started = time.time()
    config = StackConfig(
        model_dir=args.model_dir.resolve(),
        run_dir=out_dir / "stack",
        ports=StackPorts(0, 0, 0, 0, 0, 0),
        workers=args.workers,
        orchestrators=args.orchestrators,
        extra_env=parse_assignments(args.stack_env, source="--stack-env"),
    )
    print(f"starting the local stack (logs in {config.run_dir / 'logs'}) ...", file=sys.stderr)

    def restarted(event: RestartEvent) -> None:
        state = "ready" if event.ready_at is not None else f"failed: {event.error}"
        print(f"  {event.child} restarted (#{event.restart_number}), {state}", file=sys.stderr)

    summaries = []
    async with (
        LocalStack(config, on_restart=restarted) as stack,
        ScoringClient(stack.target, channels=args.channels) as client,
    ):
        await _settle(client, stream, args.deadline_ms / 1000)
        for i, spec in enumerate(phases):
            summary = await _run_phase(spec, stack, client, stream, args, timing, args.seed + i)
            summaries.append(summary)
            print(
                f"{spec.name}: {summary['answered']}/{summary['sent']} answered, "
                f"{summary['late']} late, {summary['deadline_exceeded']} DEADLINE_EXCEEDED, "
                f"recovery {summary['recovery_s']} s",
                file=sys.stderr,
                flush=True,
            )
            await _settle(client, stream, args.deadline_ms / 1000)
        total_restarts = dict(stack.supervisor.restarts) if stack.supervisor else {}
    return {
        "meta": {
            "command": "python -m loadtests.faults " + shlex.join(args.argv),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "wall_s": round(time.time() - started, 1),
            "git_commit": git_commit(),
            "cpus": os.cpu_count(),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),
            "rate": args.rate,
            "deadline_ms": args.deadline_ms,
            "late_after_ms": args.deadline_ms + _LATE_GRACE_MS,
            "arrivals": args.arrivals,
            "repeat_share": args.repeat_share,
            "timing_s": {
                "pre": timing.pre_s,
                "fault": timing.fault_s,
                "post": timing.post_s,
                "kill_wait": timing.kill_wait_s,
            },
            "workers": args.workers,
            "orchestrators": args.orchestrators,
            "restarts": total_restarts,
        },
        "phases": summaries,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.faults", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--phases", default="all", help="comma-separated phase names, or all (the default)"
    )
    parser.add_argument("--rate", type=float, default=100.0, help="requests/s, open loop")
    parser.add_argument("--pre", type=float, default=2.0, help="seconds of load before the fault")
    parser.add_argument("--fault", type=float, default=3.0, help="seconds a SIGSTOP lasts")
    parser.add_argument("--post", type=float, default=4.0, help="seconds of load after the fault")
    parser.add_argument(
        "--kill-wait", type=float, default=10.0, help="seconds a kill phase leaves for the restart"
    )
    parser.add_argument("--deadline-ms", type=float, default=50.0, help="gRPC deadline per call")
    parser.add_argument(
        "--arrivals", choices=[a.value for a in Arrivals], default=Arrivals.POISSON.value
    )
    parser.add_argument("--repeat-share", type=float, default=0.1, help="share of repeated tx")
    parser.add_argument("--workers", type=int, default=2, help="screening workers")
    parser.add_argument("--orchestrators", type=int, default=1, help="orchestrator processes")
    parser.add_argument("--channels", type=int, default=2, help="gRPC channels of the generator")
    parser.add_argument("--source", choices=("simulator", "samples"), default="simulator")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument(
        "--stack-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting for the stack's services, e.g. CASCADE_HEDGING__ENABLED=false; repeatable",
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".run" / "faults")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the matrix; print the table; write faults.json and faults.md. Exit 1 on bookkeeping
    problems, 2 on bad arguments."""
    import uvloop

    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        phases = parse_phases(args.phases)
        PhaseTiming(args.pre, args.fault, args.post, args.kill_wait)
    except ValueError as exc:
        parser.error(str(exc))
    report = uvloop.run(stopped_by_sigterm(run_matrix(args, phases)))
    table = markdown_table(report["phases"])
    out_dir: Path = args.out.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "faults.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "faults.md").write_text(f"`{report['meta']['command']}`\n\n{table}")
    print(table)
    print(f"wrote {out_dir / 'faults.json'} and {out_dir / 'faults.md'}")
    problems = [p for s in report["phases"] for p in s["bookkeeping_problems"]]
    return 1 if problems else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
