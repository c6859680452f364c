"""``cascade loadtest``: load the local stack (or a running one), write the report and the PNGs.

Without ``--target`` it starts a :class:`cascade.stack.LocalStack` on free loopback ports and the
naive baseline (:mod:`loadtests.naive`) beside it on the same Redis, NATS and Triton; with
``--target`` it loads that endpoint (loopback only) and, if ``--baseline-target`` is given, a
running naive server too. For each target it warms up, measures one call in flight
(``--serial-count``), then runs one open-loop step at ``--rate`` or, with ``--sweep``, the capacity
sweep; the two targets' steps alternate so both see the same machine. Writes ``report.json``,
``tables.md``, ``summary.png`` and (with ``--sweep``) ``sweep.png`` into ``--out``.
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
from pathlib import Path
from typing import Any

from cascade.settings import DEFAULT_MODEL_DIR, REPO_ROOT
from loadtests.address import parse_loopback_target
from loadtests.cpu import CpuMeter, cpu_report
from loadtests.replay import ReplayStream, load_transactions
from loadtests.report import (
    Criteria,
    Goals,
    SweepPlan,
    SweepPoint,
    capacity,
    capacity_table,
    compare,
    evaluate_goals,
    next_sweep_rate,
)
from loadtests.runner import LoadSettings, TargetRunner, sweep_point
from loadtests.schedule import Arrivals
from loadtests.tables import markdown_tables, text_table

__all__ = ["add_arguments", "run"]

logger = logging.getLogger(__name__)


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
    where.add_argument("--workers", type=int, default=2, help="screening workers (own stack)")
    where.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    where.add_argument(
        "--stack-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the own stack's services (repeatable), for A/B runs",
    )
    load = parser.add_argument_group("load")
    load.add_argument("--rate", type=float, default=500.0, help="requests/s of the single step")
    load.add_argument("--duration", type=float, default=10.0, help="seconds per step")
    load.add_argument("--count", type=int, default=None, help="at most this many per step")
    load.add_argument(
        "--arrivals", choices=[a.value for a in Arrivals], default=Arrivals.POISSON.value
    )
    load.add_argument("--repeat-share", type=float, default=0.1, help="share of repeated tx")
    load.add_argument("--processes", type=int, default=1, help="generator processes")
    load.add_argument("--channels", type=int, default=1, help="gRPC channels per process")
    load.add_argument("--deadline-ms", type=float, default=50.0, help="gRPC deadline per call")
    load.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per target")
    load.add_argument("--serial-count", type=int, default=1000, help="1-in-flight calls (0: skip)")
    load.add_argument("--serial-duration", type=float, default=10.0)
    load.add_argument("--source", choices=("simulator", "samples"), default="simulator")
    load.add_argument("--seed", type=int, default=7, help="simulator and schedule seed")
    slo = parser.add_argument_group("SLO and sweep")
    slo.add_argument("--budget-ms", type=float, default=50.0, help="every answer within this")
    slo.add_argument("--p99-target-ms", type=float, default=10.0, help="p99 at capacity")
    slo.add_argument("--sweep", action="store_true", help="find the capacity at SLO")
    slo.add_argument("--sweep-start", type=float, default=50.0)
    slo.add_argument("--sweep-factor", type=float, default=1.5)
    slo.add_argument("--sweep-max", type=float, default=6000.0)
    slo.add_argument("--sweep-refine", type=int, default=2, help="bisection steps after a fail")
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=REPO_ROOT / ".run" / "loadtest")
    out.add_argument(
        "--render",
        type=Path,
        metavar="REPORT_JSON",
        help="no load: redraw the tables and PNGs of an earlier report.json into --out",
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


def _git_commit() -> str:
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
    """``["K=V", ...]`` -> ``{"K": "V"}``; ValueError naming a pair without ``=``."""
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--stack-env wants KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


@asynccontextmanager
async def _targets(args: argparse.Namespace, out_dir: Path) -> AsyncIterator[dict[str, str]]:
    """Name -> loopback target of every system to load; starts and stops what it owns."""
    if args.target:
        parse_loopback_target(args.target)
        found = {"cascade": args.target}
        if args.baseline_target and not args.no_baseline:
            parse_loopback_target(args.baseline_target)
            found["naive"] = args.baseline_target
        yield found
        return
    from cascade.stack import LocalStack, StackConfig, StackPorts
    from loadtests.naive import NaiveStack

    model_dir = args.model_dir.resolve()
    run_dir = out_dir / "stack"
    print(f"starting the local stack (logs in {run_dir / 'logs'}) ...", file=sys.stderr, flush=True)
    async with AsyncExitStack() as stack:
        local = await stack.enter_async_context(
            LocalStack(
                StackConfig(
                    model_dir=model_dir,
                    run_dir=run_dir,
                    ports=StackPorts(0, 0, 0, 0, 0, 0),
                    workers=args.workers,
                    extra_env=stack_env(args.stack_env),
                )
            )
        )
        found = {"cascade": local.target}
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
            found["naive"] = naive.target
        yield found


async def run_loadtest(
    args: argparse.Namespace, argv: Sequence[str], out_dir: Path
) -> dict[str, Any]:
    """Run everything the arguments ask for and return the report (``out_dir`` holds the stack's
    logs when this starts one)."""
    settings = _settings(args)
    load_at_start = round(os.getloadavg()[0], 2)
    started = time.time()
    per_step = int(max(args.rate, args.sweep_max if args.sweep else 0) * args.duration)
    base = load_transactions(args.source, count=min(max(per_step, 5000), 200_000), seed=args.seed)
    nonce = secrets.token_hex(3)
    plan = SweepPlan(
        start_rate=args.sweep_start,
        factor=args.sweep_factor,
        max_rate=args.sweep_max,
        refine_steps=args.sweep_refine,
    )
    async with _targets(args, out_dir) as targets, AsyncExitStack() as stack:
        runners = [
            await stack.enter_async_context(
                TargetRunner(
                    name,
                    target,
                    ReplayStream(base, nonce=nonce),
                    settings,
                    cpu_meter=CpuMeter() if CpuMeter.available() else None,
                )
            )
            for name, target in targets.items()
        ]
        idle_cpu = await _idle_cpu(2.0)
        for runner in runners:
            await runner.warmup()
        for runner in runners:
            await runner.run_serial()
        if args.sweep:
            await _interleaved_sweep(runners, plan)
        else:
            for runner in runners:
                await runner.step(args.rate)
    report = build_report(args, argv, runners, targets, started)
    report["meta"]["load_average_1m_at_start"] = load_at_start
    report["meta"]["idle_cpu_cores"] = idle_cpu
    return report


async def _idle_cpu(seconds: float) -> dict[str, float]:
    """Cores each component burns with no load at all (what per-answer CPU sits on top of)."""
    if not CpuMeter.available():
        return {}
    meter = CpuMeter()
    before = await asyncio.to_thread(meter.snapshot)
    await asyncio.sleep(seconds)
    after = await asyncio.to_thread(meter.snapshot)
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
        }
        for r in runners
    }
    comparison = (
        compare(per_target["cascade"], per_target["naive"]) if "naive" in per_target else None
    )
    report: dict[str, Any] = {
        "meta": {
            "command": "cascade loadtest " + shlex.join(argv),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "wall_s": round(time.time() - started, 1),
            "git_commit": _git_commit(),
            "cpus": os.cpu_count(),
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
        },
        "targets": per_target,
        "comparison": comparison,
    }
    report["goals"] = evaluate_goals(per_target["cascade"], comparison, Goals())
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


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Run ``cascade loadtest`` with parsed ``args`` on uvloop; prints the tables; exit status."""
    import uvloop

    try:
        for target in (args.target, args.baseline_target):
            if target:
                parse_loopback_target(target)
        stack_env(args.stack_env)
    except ValueError as exc:  # NotLoopbackError too
        print(f"cascade loadtest: {exc}", file=sys.stderr)
        return 2
    out_dir: Path = args.out.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.render:
        report = json.loads(args.render.read_text())
        if args.render.resolve() != (out_dir / "report.json"):
            (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        _write_outputs(report, out_dir, sweep=bool(report["meta"].get("sweep")))
        print(text_table(report))
        return 0
    report = uvloop.run(run_loadtest(args, argv if argv is not None else sys.argv[2:], out_dir))
    _write_outputs(report, out_dir, sweep=args.sweep)
    print(text_table(report))
    print(f"\nwrote {out_dir / 'report.json'} and PNGs beside it")
    problems = [
        p
        for t in report["targets"].values()
        for s in [t["serial"], *t["steps"]]
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
