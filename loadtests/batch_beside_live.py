"""Do large ``ScoreBatch`` calls hold back live ``Score`` calls? Live calls at a fixed rate (open
loop, each with the caller's deadline), alone and beside back-to-back batches, phases alternating
in one run against one stack.

Usage: ``python -m loadtests.batch_beside_live [--target HOST:PORT] [--rate 100] [--batch 1000]``
(without ``--target`` it starts a local stack on free ports). Prints, per phase, the live calls'
p50/p99/max, how many came late or failed, and how many were degraded, by reason.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from cascade.settings import REPO_ROOT
from cascade.v1 import scoring_pb2, scoring_pb2_grpc
from cascade.wire import to_wire
from devstack.stack_settings import parse_assignments
from loadtests.batch_gain import fresh_copies, stack_target
from loadtests.compare import CompareStack
from loadtests.histogram import percentile_of_sorted
from loadtests.replay import load_transactions

R = scoring_pb2
STAGES = ("redis", "stage1", "stage2", "server total", "outside the server")


@dataclass
class Phase:
    """What the live calls of one phase got."""

    latencies_ms: list[float] = field(default_factory=list)
    failed: collections.Counter[str] = field(default_factory=collections.Counter)
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    degraded: int = 0
    batches: list[float] = field(default_factory=list)  # seconds each batch took
    batch_degraded: int = 0  # the batches' degraded answers
    # Where the live calls' time went: the server's own timings, and the rest of the call.
    stages_ms: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in STAGES})


async def _live(
    stub: scoring_pb2_grpc.ScoringServiceStub,
    txs: list[scoring_pb2.Transaction],
    rate: float,
    deadline_s: float,
    phase: Phase,
) -> None:
    start = time.monotonic()
    tasks = []

    async def call(tx: scoring_pb2.Transaction) -> None:
        sent = time.monotonic()
        try:
            reply = await stub.Score(R.ScoreRequest(transaction=tx), timeout=deadline_s)
        except grpc.aio.AioRpcError as exc:
            phase.failed[exc.code().name] += 1
            return
        latency_ms = (time.monotonic() - sent) * 1000
        phase.latencies_ms.append(latency_ms)
        t = reply.timings
        for name, value_ms in zip(
            STAGES,
            (
                t.redis_us / 1000,
                t.stage1_us / 1000,
                t.stage2_us / 1000,
                t.total_us / 1000,
                latency_ms - t.total_us / 1000,
            ),
            strict=True,
        ):
            phase.stages_ms[name].append(value_ms)
        if reply.degraded:
            phase.degraded += 1
            phase.reasons.update(R.Reason.Name(r).removeprefix("REASON_") for r in reply.reasons)

    for i, tx in enumerate(txs):
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        tasks.append(asyncio.create_task(call(tx)))
    await asyncio.gather(*tasks)


async def _batches(
    stub: scoring_pb2_grpc.ScoringServiceStub,
    base: list[scoring_pb2.Transaction],
    args: argparse.Namespace,
    until: asyncio.Event,
    phase: Phase,
) -> None:
    """Back-to-back batches of ``args.batch`` until ``until`` is set."""
    while not until.is_set():
        request = R.ScoreBatchRequest(transactions=fresh_copies(base[: args.batch]))
        started = time.monotonic()
        reply = await stub.ScoreBatch(request, timeout=args.batch_deadline_s)
        phase.batches.append(time.monotonic() - started)
        phase.batch_degraded += sum(r.degraded for r in reply.results)


async def measure(args: argparse.Namespace) -> dict[str, Phase]:
    """Each phase's live outcomes, over ``args.rounds`` rounds of (alone, beside batches), on
    each stack (with ``--compare-env`` or ``--compare-ref``, a second one with that environment
    or from that commit, steps alternating)."""
    n_live = int(args.rate * args.seconds)
    base = [
        to_wire(t)
        for t in load_transactions("simulator", count=max(n_live, args.batch), seed=args.seed)
    ]
    envs = {"": parse_assignments(args.stack_env, source="--stack-env")}
    if args.compare_env:
        envs[" ".join(args.compare_env) + ": "] = {
            **envs[""],
            **parse_assignments(args.compare_env, source="--compare-env"),
        }
    phases: dict[str, Phase] = {}
    async with contextlib.AsyncExitStack() as stack:
        stubs: dict[str, scoring_pb2_grpc.ScoringServiceStub] = {}
        targets = {
            label: await stack.enter_async_context(stack_target(args, env, f"batch_beside_live{i}"))
            for i, (label, env) in enumerate(envs.items())
        }
        if args.compare_ref:
            other = await stack.enter_async_context(
                CompareStack(
                    REPO_ROOT,
                    args.compare_ref,
                    run_dir=REPO_ROOT / ".run" / "batch_beside_live-compare",
                    orchestrators=1,
                    extra_env=envs[""],
                )
            )
            targets[f"{args.compare_ref}: "] = other.target
        for label, target in targets.items():
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(target))
            stub = stubs[label] = scoring_pb2_grpc.ScoringServiceStub(channel)
            warm = R.ScoreBatchRequest(transactions=fresh_copies(base[:100]))
            await stub.ScoreBatch(warm, timeout=10.0)
            await _live(stub, fresh_copies(base[:200]), args.rate, 1.0, Phase())
        for _ in range(args.rounds):
            for label, stub in stubs.items():
                for beside in (False, True):
                    name = label + (f"beside {args.batch}-item batches" if beside else "alone")
                    phase = phases.setdefault(name, Phase())
                    done = asyncio.Event()
                    batches = (
                        asyncio.create_task(_batches(stub, base, args, done, phase))
                        if beside
                        else None
                    )
                    live = fresh_copies(base[:n_live])
                    await _live(stub, live, args.rate, args.deadline_ms / 1000, phase)
                    done.set()
                    if batches is not None:
                        await batches
    return phases


def _percentile(values: list[float], p: float) -> float:
    return percentile_of_sorted(sorted(values), p) if values else float("nan")


def main(argv: Sequence[str] | None = None) -> int:
    """Print one row per phase."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="")
    parser.add_argument("--rate", type=float, default=100.0, help="live calls per second")
    parser.add_argument("--seconds", type=float, default=5.0, help="live load per phase")
    parser.add_argument("--deadline-ms", type=float, default=50.0)
    parser.add_argument("--batch", type=int, default=1000, help="transactions per ScoreBatch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--batch-deadline-s", type=float, default=30.0, help="each ScoreBatch's deadline"
    )
    parser.add_argument(
        "--stack-env", action="append", default=[], metavar="KEY=VALUE", help="for the stack"
    )
    parser.add_argument(
        "--compare-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a second stack with this environment too, measured alternating with the first",
    )
    parser.add_argument(
        "--compare-ref",
        metavar="GIT_REF",
        help="a second stack from this commit's checkout (a worktree under .run/compare/, "
        "its own `cascade up`, --stack-env for it too), measured alternating with the first",
    )
    args = parser.parse_args(argv)
    try:
        parse_assignments(args.stack_env, source="--stack-env")
        parse_assignments(args.compare_env, source="--compare-env")
    except ValueError as exc:
        print(f"batch_beside_live: {exc}", file=sys.stderr)
        return 2
    phases = asyncio.run(measure(args))
    print(
        "| live calls | answered | p50 ms | p99 ms | max ms | late | failed | degraded (reasons) "
        "| batches (median s) | batch answers degraded |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, p in phases.items():
        late = sum(ms >= args.deadline_ms for ms in p.latencies_ms)
        reasons = ", ".join(f"{k} {v}" for k, v in p.reasons.most_common()) or "-"
        failed = ", ".join(f"{k} {v}" for k, v in p.failed.items()) or "0"
        batches = f"{len(p.batches)} ({statistics.median(p.batches):.2f})" if p.batches else "-"
        print(
            f"| {name} | {len(p.latencies_ms)} | {_percentile(p.latencies_ms, 50):.1f} "
            f"| {_percentile(p.latencies_ms, 99):.1f} | {max(p.latencies_ms, default=0):.1f} "
            f"| {late} | {failed} | {p.degraded} ({reasons}) | {batches} | {p.batch_degraded} |"
        )
    print("\nLive calls' time by stage, ms, p50 / p99 (the server's timings; outside the server:")
    print("the client-measured latency less the server's total, i.e. gRPC, queues, the network)\n")
    print("| live calls | " + " | ".join(STAGES) + " |")
    print("|---|" + "---|" * len(STAGES))
    for name, p in phases.items():
        cells = [
            f"{_percentile(p.stages_ms[s], 50):.2f} / {_percentile(p.stages_ms[s], 99):.2f}"
            for s in STAGES
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
