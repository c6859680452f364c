"""``cascade loadtest``: load the local stack (or a running one), write the report and the PNGs.

Without ``--target`` it starts a :class:`devstack.stack.LocalStack` on free loopback ports and the
naive baseline (:mod:`loadtests.naive`) beside it on the same Redis, NATS and Triton; with
``--target`` it loads that endpoint (loopback only) and, if ``--baseline-target`` is given, a
running naive server too. For each target it warms up, measures one call in flight
(``--serial-count``), then runs one open-loop step at ``--rate`` or, with ``--sweep``, the capacity
sweep; the two targets' steps alternate so both see the same machine. Writes ``report.json``,
``tables.md``, ``summary.png`` and (with ``--sweep``) ``sweep.png`` into ``--out``.

With ``--history mature`` (the default) the load uses simulated cards with a full history and
backfills that history into every target with ``ScoreBatch`` before warm-up
(:mod:`loadtests.history`). After the sweep (or with ``--overload-rate``) each target gets one
overload step at ``--overload-factor`` times the cascade's capacity. ``--compare-ref REF`` starts
that commit's own stack beside this one (:mod:`loadtests.compare`) and runs every step against it
too, so the report shows both side by side.
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
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from cascade.cpu_latency import CpuLatencyHold
from cascade.runtime import stopped_by_sigterm
from cascade.settings import DEFAULT_MODEL_DIR, REPO_ROOT
from cascade.shared_port import local_stack_orchestrators
from devstack.stack_settings import non_negative_int, parse_assignments, positive_int
from loadtests.address import parse_loopback_target
from loadtests.cpu import CpuMeter, CpuSnapshot, cpu_report, idle_settings
from loadtests.history import HistoryMode, MatureSplit, backfill_batches
from loadtests.machine_speed import WORKLOAD as MACHINE_SPEED_WORKLOAD
from loadtests.machine_speed import machine_speed
from loadtests.replay import ReplayStream, load_mature, load_transactions
from loadtests.report import (
    FLOOR_NAME,
    Criteria,
    Goals,
    SweepPlan,
    SweepPoint,
    capacity,
    capacity_table,
    compare,
    evaluate_goals,
    next_sweep_rate,
    overload_basis,
)
from loadtests.runner import LoadSettings, TargetRunner, sweep_point
from loadtests.schedule import Arrivals
from loadtests.tables import markdown_tables, text_table

if TYPE_CHECKING:
    from devstack.servers import ManagedProcess

__all__ = ["add_arguments", "run"]

logger = logging.getLogger(__name__)

COMPARE_NAME: Final = "compare"
_SHARED_ROLES: Final = ("redis", "nats", "triton")
_STACK_ROLES: Final = {
    "cascade": ("orchestrator", "screening-workers", *_SHARED_ROLES),
    "naive": ("naive-server", "naive-workers", *_SHARED_ROLES),
}


@dataclass(frozen=True, slots=True)
class TargetSpec:
    """One system to load: its name in the report, endpoint, and where its CPU is measured.

    ``stack_root`` is the process its servers descend from (None: this process); ``stack_roles``
    the roles that make up its stack (None: everything measured but the generator).
    ``cpu_latency_us`` keeps the cores awake for its steps (None: the machine as it is).
    """

    name: str
    target: str
    stack_root: int | None = None
    stack_roles: tuple[str, ...] | None = None
    cpu_latency_us: int | None = None
    """Keep the cores from deep idle during this target's steps (:mod:`cascade.cpu_latency`)."""


@dataclass(slots=True)
class Targets:
    """Every target of a run, and what the report says about a compared checkout."""

    specs: list[TargetSpec] = field(default_factory=list)
    compare: dict[str, Any] | None = None

    @property
    def endpoints(self) -> dict[str, str]:
        """Name -> endpoint."""
        return {spec.name: spec.target for spec in self.specs}

    def meter(self, spec: TargetSpec) -> CpuMeter | None:
        """The CPU meter for ``spec``: its own stack's subtree, never another target's."""
        if not CpuMeter.available():
            return None
        others = {s.stack_root for s in self.specs if s.stack_root is not None}
        if spec.stack_root is not None:
            return CpuMeter(stack_root=spec.stack_root)
        return CpuMeter(skip=others)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``loadtest`` options (shared by ``cascade loadtest`` and ``python -m loadtests``)."""
    where = parser.add_argument_group("where the load goes")
    where.add_argument(
        "--target",
        help="HOST:PORT of a running scoring server (loopback only); default: start a local stack",
    )
    where.add_argument(
        "--baseline-target", help="with --target: HOST:PORT of a running naive baseline server"
    )
    where.add_argument("--no-baseline", action="store_true", help="do not measure the baseline")
    where.add_argument(
        "--floor",
        action="store_true",
        help="also load the gRPC floor (loadtests.grpc_floor: the orchestrator's gRPC front "
        "answering at once, no work) step for step: what gRPC alone costs per call here",
    )
    where.add_argument(
        "--compare-ref",
        metavar="GIT_REF",
        help="also start this commit's own stack (a worktree under .run/compare/) and run every "
        "step against it, alternating with the current one",
    )
    where.add_argument(
        "--compare-cpu-latency-us",
        type=non_negative_int,
        metavar="US",
        help="also run every step against this stack with the cores kept out of deep idle "
        "(/dev/cpu_dma_latency held at US microseconds; 0: they poll instead of halting), "
        "alternating with the machine as it is: what idle cores cost here (needs root)",
    )
    where.add_argument(
        "--cpu-latency-us",
        type=non_negative_int,
        metavar="US",
        help="hold /dev/cpu_dma_latency at US microseconds for the whole run (needs root)",
    )
    where.add_argument(
        "--workers", type=positive_int, default=2, help="screening workers (own stack)"
    )
    where.add_argument(
        "--orchestrators",
        type=positive_int,
        default=local_stack_orchestrators(),
        help="orchestrator processes sharing the port (own stack; default as cascade up: one "
        "per two CPU cores, at least one); the generator keeps an equal share of its "
        "connections on each",
    )
    where.add_argument(
        "--compare-orchestrators",
        type=positive_int,
        metavar="N",
        help="orchestrator processes of the --compare-ref stack (default: --orchestrators), "
        "to compare two layouts of one commit",
    )
    where.add_argument(
        "--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="models for the stack it starts"
    )
    where.add_argument(
        "--stack-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the own stack's services (repeatable), for A/B runs",
    )
    where.add_argument(
        "--compare-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the --compare-ref stack only, over --stack-env "
        "(repeatable): with --compare-ref HEAD, one setting A/B'd step by step",
    )
    load = parser.add_argument_group("load")
    load.add_argument("--rate", type=float, default=500.0, help="requests/s of the single step")
    load.add_argument("--duration", type=float, default=10.0, help="seconds per step")
    load.add_argument("--count", type=int, default=None, help="at most this many per step")
    load.add_argument(
        "--arrivals",
        choices=[a.value for a in Arrivals],
        default=Arrivals.POISSON.value,
        help="how send times are spaced at the offered rate (open loop either way)",
    )
    load.add_argument("--repeat-share", type=float, default=0.1, help="share of repeated tx")
    load.add_argument("--processes", type=int, default=1, help="generator processes")
    load.add_argument("--channels", type=int, default=1, help="gRPC channels per process")
    load.add_argument("--deadline-ms", type=float, default=50.0, help="gRPC deadline per call")
    load.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per target")
    load.add_argument("--serial-count", type=int, default=1000, help="1-in-flight calls (0: skip)")
    load.add_argument(
        "--serial-duration",
        type=float,
        default=10.0,
        help="most seconds of the one-in-flight step (it also stops at --serial-count calls)",
    )
    load.add_argument(
        "--source",
        choices=("simulator", "samples"),
        default="simulator",
        help="transactions from the seeded simulator stream, or the CLI's labelled samples",
    )
    load.add_argument(
        "--history",
        choices=[m.value for m in HistoryMode],
        default=HistoryMode.MATURE.value,
        help="mature: cards with a full history, backfilled with ScoreBatch before warm-up "
        "(simulator only); as-simulated: histories grow from empty as the stream replays",
    )
    load.add_argument("--seed", type=int, default=7, help="simulator and schedule seed")
    slo = parser.add_argument_group("SLO and sweep")
    slo.add_argument("--budget-ms", type=float, default=50.0, help="every answer within this")
    slo.add_argument("--p99-target-ms", type=float, default=10.0, help="p99 at capacity")
    slo.add_argument("--sweep", action="store_true", help="find the capacity at SLO")
    slo.add_argument("--sweep-start", type=float, default=50.0, help="first offered rate (/s)")
    slo.add_argument(
        "--sweep-factor", type=float, default=1.5, help="each step offers this times the last"
    )
    slo.add_argument("--sweep-max", type=float, default=6000.0, help="highest rate tried (/s)")
    slo.add_argument("--sweep-refine", type=int, default=2, help="bisection steps after a fail")
    over = parser.add_argument_group("overload step (after the sweep, or with --overload-rate)")
    over.add_argument(
        "--overload-rate", type=float, default=None, help="requests/s of the overload step"
    )
    over.add_argument(
        "--overload-factor",
        type=float,
        default=3.0,
        help="after --sweep: the overload rate as a multiple of the cascade's capacity (of its "
        "lowest step's rate when no step met the SLO)",
    )
    over.add_argument("--overload-duration", type=float, default=10.0, help="seconds")
    over.add_argument("--no-overload", action="store_true", help="no overload step")
    out = parser.add_argument_group("output")
    out.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / ".run" / "loadtest",
        help="folder for report.json, tables.md and the PNGs",
    )
    out.add_argument(
        "--render",
        type=Path,
        metavar="REPORT_JSON",
        help="no load: redraw the tables and PNGs of an earlier report.json into --out, its goals "
        "judged again against the current targets",
    )
    out.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress line on stderr (default: when stderr is a terminal)",
    )


def _settings(args: argparse.Namespace) -> LoadSettings:
    return LoadSettings(
        rate_per_s=args.rate,
        duration_s=args.duration,
        max_count=args.count,
        arrivals=Arrivals(args.arrivals),
        repeat_share=args.repeat_share,
        processes=args.processes,
        channels=args.channels,
        deadline_ms=args.deadline_ms,
        criteria=Criteria(p99_target_ms=args.p99_target_ms, budget_ms=args.budget_ms),
        warmup_s=args.warmup,
        serial_count=args.serial_count,
        serial_duration_s=args.serial_duration,
        seed=args.seed,
        progress=args.progress,
    )


def git_commit() -> str:
    """The checkout's short commit id ('' outside a git checkout), for a report's meta."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def stack_env(pairs: Sequence[str]) -> dict[str, str]:
    """``--stack-env`` pairs as a dict (:func:`devstack.stack_settings.parse_assignments`: a
    SettingsInputError, a ValueError, names a malformed pair or a key the stack sets itself)."""
    return parse_assignments(pairs, source="--stack-env")


@asynccontextmanager
async def _targets(args: argparse.Namespace, out_dir: Path) -> AsyncIterator[Targets]:
    """Every system to load; starts and stops what it owns."""
    found = Targets()
    async with AsyncExitStack() as stack:
        if args.target:
            parse_loopback_target(args.target)
            found.specs.append(TargetSpec("cascade", args.target))
            if args.baseline_target and not args.no_baseline:
                parse_loopback_target(args.baseline_target)
                found.specs.append(TargetSpec("naive", args.baseline_target))
        else:
            await _start_own_stack(args, out_dir, stack, found)
        if args.compare_ref:
            await _start_compare(args, out_dir, stack, found)
        elif args.compare_cpu_latency_us is not None:
            _compare_awake(args.compare_cpu_latency_us, found)
        if args.floor:
            await _start_floor(out_dir, stack, found)
        yield found


async def _start_own_stack(
    args: argparse.Namespace, out_dir: Path, stack: AsyncExitStack, found: Targets
) -> None:
    from devstack.stack import LocalStack, StackConfig, StackPorts
    from loadtests.naive import NaiveStack

    model_dir = args.model_dir.resolve()
    run_dir = out_dir / "stack"
    print(f"starting the local stack (logs in {run_dir / 'logs'}) ...", file=sys.stderr, flush=True)
    local = await stack.enter_async_context(
        LocalStack(
            StackConfig(
                model_dir=model_dir,
                run_dir=run_dir,
                ports=StackPorts(0, 0, 0, 0, 0, 0),
                workers=args.workers,
                orchestrators=args.orchestrators,
                extra_env=stack_env(args.stack_env),
            )
        )
    )
    found.specs.append(TargetSpec("cascade", local.target, stack_roles=_STACK_ROLES["cascade"]))
    if not args.no_baseline:
        naive = await stack.enter_async_context(
            NaiveStack(
                model_dir=model_dir,
                redis_url=local.redis_url,
                nats_url=local.nats_url,
                triton_url=local.triton_url,
                log_dir=run_dir / "logs",
                workers=args.workers,
            )
        )
        found.specs.append(TargetSpec("naive", naive.target, stack_roles=_STACK_ROLES["naive"]))


def floor_process(log_dir: Path) -> tuple[ManagedProcess, str]:
    """The gRPC floor server (:mod:`loadtests.grpc_floor`) as a process on a free loopback port,
    ready once its health says SERVING, and its ``127.0.0.1:PORT``."""
    from devstack.servers import resolve_port
    from devstack.stack import orchestrator_process

    port = resolve_port(0)
    env = dict(os.environ) | {
        "CASCADE_SERVER__HOST": "127.0.0.1",
        "CASCADE_SERVER__PORT": str(port),
        "PYTHONUNBUFFERED": "1",
    }
    log_dir.mkdir(parents=True, exist_ok=True)
    process = orchestrator_process(env, log_dir, name=FLOOR_NAME, module="loadtests.grpc_floor")
    return process, f"127.0.0.1:{port}"


async def _start_floor(out_dir: Path, stack: AsyncExitStack, found: Targets) -> None:
    process, target = floor_process(out_dir / "floor")
    await stack.enter_async_context(process)
    found.specs.append(TargetSpec(FLOOR_NAME, target, stack_roles=(FLOOR_NAME,)))


def _compare_awake(max_us: int, found: Targets) -> None:
    """The cascade's own stack once more as the compared target, its steps run with the cores
    kept from deep idle."""
    own = found.specs[0]
    found.specs.append(
        TargetSpec(COMPARE_NAME, own.target, stack_roles=own.stack_roles, cpu_latency_us=max_us)
    )
    found.compare = {
        "ref": f"this checkout, cores kept awake (cpu_dma_latency {max_us} us)",
        "commit": git_commit(),
        "target": own.target,
        "cpu_latency_us": max_us,
    }


async def _start_compare(
    args: argparse.Namespace, out_dir: Path, stack: AsyncExitStack, found: Targets
) -> None:
    from loadtests.compare import CompareStack

    run_dir = out_dir / "compare-stack"
    print(
        f"starting the stack of {args.compare_ref} (log in {run_dir / 'up.log'}) ...",
        file=sys.stderr,
        flush=True,
    )
    other = await stack.enter_async_context(
        CompareStack(
            REPO_ROOT,
            args.compare_ref,
            run_dir=run_dir,
            workers=args.workers,
            orchestrators=args.compare_orchestrators or args.orchestrators,
            extra_env=stack_env(args.stack_env)
            | parse_assignments(args.compare_env, source="--compare-env"),
        )
    )
    found.specs.append(TargetSpec(COMPARE_NAME, other.target, stack_root=other.pid))
    found.compare = {
        "ref": args.compare_ref,
        "env": args.compare_env,
        "commit": other.commit,
        "worktree": str(other.path),
        "target": other.target,
    }


def _workload(args: argparse.Namespace) -> tuple[HistoryMode, MatureSplit]:
    """The history mode in effect and the transactions: history to backfill (empty when
    as-simulated) and the load's base stream."""
    per_step = int(max(args.rate, args.sweep_max if args.sweep else 0) * args.duration)
    count = min(max(per_step, 5000), 200_000)
    mode = HistoryMode(args.history)
    if mode is HistoryMode.MATURE and args.source != "simulator":
        logger.warning("--history mature needs --source simulator; using as-simulated histories")
        mode = HistoryMode.AS_SIMULATED
    if mode is HistoryMode.MATURE:
        return mode, load_mature(count, seed=args.seed)
    base = load_transactions(args.source, count=count, seed=args.seed)
    return mode, MatureSplit(history=(), load=tuple(base))


def overload_rate(args: argparse.Namespace, runners: Sequence[TargetRunner]) -> float | None:
    """The overload step's rate: ``--overload-rate``, else after ``--sweep`` the factor times the
    cascade's capacity (or, when no step met the SLO, its lowest step's rate:
    :func:`~loadtests.report.overload_basis`); None for no overload step."""
    if args.no_overload:
        return None
    if args.overload_rate is not None:
        return float(args.overload_rate)
    if not args.sweep:
        return None
    basis = overload_basis({"capacity": capacity(runners[0].steps), "steps": runners[0].steps})
    return None if basis is None else round(basis * args.overload_factor, 1)


async def run_loadtest(
    args: argparse.Namespace, argv: Sequence[str], out_dir: Path
) -> dict[str, Any]:
    """Run everything the arguments ask for and return the report (``out_dir`` holds the stack's
    logs when this starts one)."""
    settings = _settings(args)
    load_at_start = round(os.getloadavg()[0], 2)
    started = time.time()
    mode, workload = _workload(args)
    batches = backfill_batches(workload.history)
    prior = workload.prior_counts
    nonce = secrets.token_hex(3)
    plan = SweepPlan(
        start_rate=args.sweep_start,
        factor=args.sweep_factor,
        max_rate=args.sweep_max,
        refine_steps=args.sweep_refine,
    )
    async with _targets(args, out_dir) as targets, AsyncExitStack() as stack:
        if args.cpu_latency_us is not None:
            stack.enter_context(CpuLatencyHold(args.cpu_latency_us))  # run() saw it take
        nonces = {spec.name: nonce for spec in targets.specs}
        if args.compare_cpu_latency_us is not None:
            # The same stack twice: its own transaction ids, or the cache would answer it.
            nonces[COMPARE_NAME] = secrets.token_hex(3)
        runners = [
            await stack.enter_async_context(
                TargetRunner(
                    spec.name,
                    spec.target,
                    ReplayStream(workload.load, nonce=nonces[spec.name], prior_history=prior),
                    settings,
                    cpu_meter=targets.meter(spec),
                    stack_roles=spec.stack_roles,
                    cpu_latency_us=spec.cpu_latency_us,
                )
            )
            for spec in targets.specs
        ]
        # Each stack's idle CPU, its own subtree only (the compared stack apart).
        idle = await asyncio.gather(
            *(_idle_cpu(targets.meter(spec), 2.0) for spec in targets.specs)
        )
        idle_cpu = idle[0] if idle else {}
        idle_by_target = {spec.name: cores for spec, cores in zip(targets.specs, idle, strict=True)}
        speed_at_start = machine_speed()  # the stacks idle: the loop may block for ~50 ms
        for runner in runners:
            if batches:
                print(
                    f"{runner.name}: backfilling {len(workload.history)} earlier transactions of "
                    f"{len(prior)} cards with ScoreBatch ...",
                    file=sys.stderr,
                    flush=True,
                )
                await runner.backfill(batches, nonce=nonces[runner.name])
        for runner in runners:
            await runner.warmup()
        for runner in runners:
            await runner.run_serial()
        if args.sweep:
            await _interleaved_sweep(runners, plan)
        else:
            for runner in runners:
                await runner.step(args.rate)
        rate = overload_rate(args, runners)
        if rate is not None:
            for runner in runners:
                report = await runner.overload_step(rate, args.overload_duration)
                _print_overload(report)
        speed_at_end = machine_speed()
    report = build_report(args, argv, runners, targets.endpoints, started)
    report["meta"]["machine_speed"] = {
        "workload": MACHINE_SPEED_WORKLOAD,
        "start": speed_at_start,
        "end": speed_at_end,
    }
    report["meta"]["load_average_1m_at_start"] = load_at_start
    report["meta"]["idle_cpu_cores"] = idle_cpu
    if targets.compare:
        targets.compare["idle_cpu_cores"] = idle_by_target.get(COMPARE_NAME, {})
    report["meta"]["history"] = {
        "mode": str(mode),
        "cards": len(prior) if prior else len({tx.card_id for tx in workload.load}),
        "backfilled_cards": len(prior),
        "backfilled_transactions": len(workload.history),
        "backfill_batches": len(batches),
        "load_base_transactions": len(workload.load),
    }
    report["meta"]["compare"] = targets.compare
    report["meta"]["overload"] = {
        "rate": rate,
        "factor": None if args.overload_rate is not None else args.overload_factor,
        "duration_s": args.overload_duration,
    }
    return report


def _print_overload(report: dict[str, Any]) -> None:
    o = report["summary"]
    print(
        f"{report['label']}: {o['answers']} answers ({o['shed']} shed, "
        f"{o['stage2_overloaded']} stage-2 overloaded), {o['late']} late, "
        f"{o['deadline_exceeded']} DEADLINE_EXCEEDED, {o['other_failures']} other failures, "
        f"p99 {o['latency_ms']['p99']:.2f} ms, max {o['latency_ms']['max']:.2f} ms",
        file=sys.stderr,
        flush=True,
    )


async def _idle_cpu(meter: CpuMeter | None, seconds: float) -> dict[str, float]:
    """Cores each component burns with no load at all (what per-answer CPU sits on top of)."""
    if meter is None:
        return {}
    before: CpuSnapshot = await asyncio.to_thread(meter.snapshot)
    await asyncio.sleep(seconds)
    after: CpuSnapshot = await asyncio.to_thread(meter.snapshot)
    cores: dict[str, float] = cpu_report(before, after, seconds, 0)["cores"]
    return cores


async def _interleaved_sweep(runners: Sequence[TargetRunner], plan: SweepPlan) -> None:
    """Each target's own sweep, one step of each in turn, so machine noise hits both alike."""
    history: dict[str, list[SweepPoint]] = {r.name: [] for r in runners}
    active = list(runners)
    while active:
        for runner in list(active):
            rate = next_sweep_rate(history[runner.name], plan)
            if rate is None:
                active.remove(runner)
                continue
            report = await runner.step(rate)
            history[runner.name].append(sweep_point(report))
            verdict = "pass" if report["passed"] else "FAIL: " + "; ".join(report["fail_reasons"])
            if report["saturation_reasons"]:
                verdict += " [saturated: " + "; ".join(report["saturation_reasons"]) + "]"
            print(
                f"{report['label']}: p50 {report['latency_ms']['p50']:.2f} ms, "
                f"p99 {report['latency_ms']['p99']:.2f} ms, max {report['latency_ms']['max']:.2f}"
                f" ms, achieved {report['achieved_rate']:.0f}/s -> {verdict}",
                file=sys.stderr,
                flush=True,
            )


def build_report(
    args: argparse.Namespace,
    argv: Sequence[str],
    runners: Sequence[TargetRunner],
    targets: dict[str, str],
    started: float,
) -> dict[str, Any]:
    """Assemble ``report.json`` from the runners' steps."""
    p99_targets = sorted(
        {args.p99_target_ms, *(t for t in (20.0, args.budget_ms) if t > args.p99_target_ms)}
    )
    per_target = {
        r.name: {
            "target": r.target,
            "serial": r.serial,
            "steps": r.steps,
            "capacity": capacity(r.steps),
            "capacity_by_p99_ms": capacity_table(r.steps, p99_targets, args.budget_ms),
            "overload": r.overload,
            "history": {"backfill": r.backfilled, "seen_by_load": r.history_seen},
        }
        for r in runners
    }
    comparison = (
        compare(per_target["cascade"], per_target["naive"]) if "naive" in per_target else None
    )
    compared = (
        compare(per_target["cascade"], per_target[COMPARE_NAME], ("cascade", COMPARE_NAME))
        if COMPARE_NAME in per_target and "cascade" in per_target
        else None
    )
    report: dict[str, Any] = {
        "meta": {
            "command": "cascade loadtest " + shlex.join(argv),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "wall_s": round(time.time() - started, 1),
            "git_commit": git_commit(),
            "cpus": os.cpu_count(),
            "idle": idle_settings(),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),
            "targets": targets,
            "budget_ms": args.budget_ms,
            "p99_target_ms": args.p99_target_ms,
            "deadline_ms": args.deadline_ms,
            "rate": args.rate,
            "duration_s": args.duration,
            "arrivals": args.arrivals,
            "repeat_share": args.repeat_share,
            "processes": args.processes,
            "channels": args.channels,
            "sweep": args.sweep,
            "source": args.source,
            "model_dir": str(args.model_dir),
            "stack_env": args.stack_env,
            "late_after_ms": _settings(args).late_after_us / 1000,
            "cpu_latency_us": args.cpu_latency_us,
        },
        "targets": per_target,
        "comparison": comparison,
        "comparison_with_ref": compared,
    }
    report["goals"] = evaluate_goals(
        per_target["cascade"], comparison, Goals(), floor=per_target.get(FLOOR_NAME)
    )
    return report


def _write_outputs(report: dict[str, Any], out_dir: Path, *, sweep: bool) -> None:
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "tables.md").write_text(markdown_tables(report) + "\n")
    try:
        from loadtests.plots import plot_summary, plot_sweep
    except ImportError:  # matplotlib missing: the JSON still stands
        logger.warning("matplotlib is not installed; no PNGs written")
        return
    plot_summary(report, out_dir / "summary.png")
    if sweep:
        plot_sweep(report, out_dir / "sweep.png")


def _check_cpu_latency(args: argparse.Namespace) -> None:
    """ValueError unless the cores can be kept awake where the arguments ask for it (before
    anything starts), or when they ask for it twice."""
    wanted = {
        flag: value
        for flag, value in (
            ("--cpu-latency-us", args.cpu_latency_us),
            ("--compare-cpu-latency-us", args.compare_cpu_latency_us),
        )
        if value is not None
    }
    if len(wanted) == 2 or (args.compare_cpu_latency_us is not None and args.compare_ref):
        raise ValueError(
            "--compare-cpu-latency-us compares this stack with itself: not with "
            "--cpu-latency-us or --compare-ref"
        )
    for flag, value in wanted.items():
        with CpuLatencyHold(value) as hold:
            if not hold.held:
                raise ValueError(f"{flag}: {hold.problem}")


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Run ``cascade loadtest`` with parsed ``args`` on uvloop; prints the tables; exit status."""
    import uvloop

    try:
        for target in (args.target, args.baseline_target):
            if target:
                parse_loopback_target(target)
        stack_env(args.stack_env)
        parse_assignments(args.compare_env, source="--compare-env")
        if args.compare_env and not args.compare_ref:
            raise ValueError("--compare-env needs --compare-ref (HEAD: this commit's own stack)")
        _check_cpu_latency(args)
    except ValueError as exc:  # NotLoopbackError too
        print(f"cascade loadtest: {exc}", file=sys.stderr)
        return 2
    out_dir: Path = args.out.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.render:
        report = json.loads(args.render.read_text())
        targets = report["targets"]
        if "cascade" in targets:  # judged again: goals added since are judged too
            report["goals"] = evaluate_goals(
                targets["cascade"], report.get("comparison"), Goals(), floor=targets.get(FLOOR_NAME)
            )
        if args.render.resolve() != (out_dir / "report.json"):
            (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        _write_outputs(report, out_dir, sweep=bool(report["meta"].get("sweep")))
        print(text_table(report))
        return 0
    report = uvloop.run(
        stopped_by_sigterm(run_loadtest(args, argv if argv is not None else sys.argv[2:], out_dir))
    )
    _write_outputs(report, out_dir, sweep=args.sweep)
    print(text_table(report))
    print(f"\nwrote {out_dir / 'report.json'} and PNGs beside it")
    problems = [
        p
        for t in report["targets"].values()
        for s in [t["serial"], *t["steps"], t.get("overload")]
        if s
        for p in s["bookkeeping_problems"]
    ]
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m loadtests``: the same as ``cascade loadtest``."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtests", description=__doc__.split("\n\n")[0]
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        return run(args, list(argv) if argv is not None else sys.argv[1:])
    return 130
