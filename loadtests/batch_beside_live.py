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
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from cascade.v1 import scoring_pb2, scoring_pb2_grpc
from cascade.wire import to_wire
from loadtests.batch_gain import fresh_copies, stack_target
from loadtests.replay import load_transactions

R = scoring_pb2


@dataclass
class Phase:
    """What the live calls of one phase got."""

    latencies_ms: list[float] = field(default_factory=list)
    failed: collections.Counter[str] = field(default_factory=collections.Counter)
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    degraded: int = 0
    batches: list[float] = field(default_factory=list)  # seconds each batch took


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
        phase.latencies_ms.append((time.monotonic() - sent) * 1000)
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
    size: int,
    until: asyncio.Event,
    phase: Phase,
) -> None:
    while not until.is_set():
        request = R.ScoreBatchRequest(transactions=fresh_copies(base[:size]))
        started = time.monotonic()
        await stub.ScoreBatch(request, timeout=30.0)
        phase.batches.append(time.monotonic() - started)


async def measure(args: argparse.Namespace) -> dict[str, Phase]:
    """Each phase's live outcomes, over ``args.rounds`` rounds of (alone, beside batches)."""
    n_live = int(args.rate * args.seconds)
    base = [
        to_wire(t)
        for t in load_transactions("simulator", count=max(n_live, args.batch), seed=args.seed)
    ]
    phases = {"alone": Phase(), f"beside {args.batch}-item batches": Phase()}
    async with stack_target(args) as target, grpc.aio.insecure_channel(target) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        await stub.ScoreBatch(
            R.ScoreBatchRequest(transactions=fresh_copies(base[:100])), timeout=10.0
        )
        await _live(stub, fresh_copies(base[:200]), args.rate, 1.0, Phase())  # warm the path
        for _ in range(args.rounds):
            for name, phase in phases.items():
                live = fresh_copies(base[:n_live])
                if name == "alone":
                    await _live(stub, live, args.rate, args.deadline_ms / 1000, phase)
                    continue
                done = asyncio.Event()
                batches = asyncio.create_task(_batches(stub, base, args.batch, done, phase))
                await _live(stub, live, args.rate, args.deadline_ms / 1000, phase)
                done.set()
                await batches
    return phases


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


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
    args = parser.parse_args(argv)
    phases = asyncio.run(measure(args))
    print(
        "| live calls | answered | p50 ms | p99 ms | max ms | late | failed | degraded (reasons) "
        "| batches (median s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, p in phases.items():
        late = sum(ms >= args.deadline_ms for ms in p.latencies_ms)
        reasons = ", ".join(f"{k} {v}" for k, v in p.reasons.most_common()) or "-"
        failed = ", ".join(f"{k} {v}" for k, v in p.failed.items()) or "0"
        batches = f"{len(p.batches)} ({statistics.median(p.batches):.2f})" if p.batches else "-"
        print(
            f"| {name} | {len(p.latencies_ms)} | {_quantile(p.latencies_ms, 0.5):.1f} "
            f"| {_quantile(p.latencies_ms, 0.99):.1f} | {max(p.latencies_ms, default=0):.1f} "
            f"| {late} | {failed} | {p.degraded} ({reasons}) | {batches} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
