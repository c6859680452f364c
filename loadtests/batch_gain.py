"""Does ``ScoreBatch`` beat per-call gRPC? Scores the same transactions one ``Score`` at a time,
as concurrent ``Score`` calls, and as ``ScoreBatch`` calls, against one stack, interleaved.

Usage: ``python -m loadtests.batch_gain [--target HOST:PORT] [--n 2000] [--batch 100]``
(without ``--target`` it starts a local stack on free ports).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import grpc

from cascade.settings import DEFAULT_MODEL_DIR
from cascade.v1 import scoring_pb2, scoring_pb2_grpc
from cascade.wire import to_wire
from devstack.stack import LocalStack, StackConfig, StackPorts
from loadtests.address import parse_loopback_target
from loadtests.replay import load_transactions


@asynccontextmanager
async def stack_target(
    args: argparse.Namespace, env: dict[str, str] | None = None, name: str = "batch_gain"
) -> AsyncIterator[str]:
    """``args.target`` (loopback only), or the target of a local stack started for the run
    (with ``env`` for its services, its files under ``.run/NAME``)."""
    if args.target:
        target = parse_loopback_target(args.target)
        yield f"{target.host}:{target.port}"
        return
    config = StackConfig(
        model_dir=DEFAULT_MODEL_DIR,
        run_dir=Path(".run") / name,
        ports=StackPorts(0, 0, 0, 0, 0, 0),
        extra_env=env or {},
    )
    async with LocalStack(config) as stack:
        yield stack.target


def fresh_copies(txs: Sequence[scoring_pb2.Transaction]) -> list[scoring_pb2.Transaction]:
    """Copies with new ids, so no mode is answered from another mode's cache entries."""
    nonce = uuid.uuid4().hex[:8]
    out = []
    for tx in txs:
        copy = scoring_pb2.Transaction()
        copy.CopyFrom(tx)
        copy.transaction_id = f"{tx.transaction_id}.{nonce}"
        out.append(copy)
    return out


async def _serial(
    stub: scoring_pb2_grpc.ScoringServiceStub, txs: list[scoring_pb2.Transaction]
) -> None:
    for tx in txs:
        await stub.Score(scoring_pb2.ScoreRequest(transaction=tx), timeout=1.0)


async def _concurrent(
    stub: scoring_pb2_grpc.ScoringServiceStub, txs: list[scoring_pb2.Transaction], width: int
) -> None:
    for i in range(0, len(txs), width):
        chunk = txs[i : i + width]
        await asyncio.gather(
            *(stub.Score(scoring_pb2.ScoreRequest(transaction=tx), timeout=5.0) for tx in chunk)
        )


async def _batched(
    stub: scoring_pb2_grpc.ScoringServiceStub, txs: list[scoring_pb2.Transaction], size: int
) -> None:
    for i in range(0, len(txs), size):
        request = scoring_pb2.ScoreBatchRequest(transactions=txs[i : i + size])
        await stub.ScoreBatch(request, timeout=10.0)


async def measure(args: argparse.Namespace) -> dict[str, list[float]]:
    """Transactions per second of each mode, per round."""
    base = [to_wire(t) for t in load_transactions("simulator", count=args.n, seed=args.seed)]
    rates: dict[str, list[float]] = {
        "Score, 1 in flight": [],
        f"Score, {args.batch} concurrent": [],
        f"ScoreBatch of {args.batch}": [],
    }
    async with stack_target(args) as target, grpc.aio.insecure_channel(target) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        await _batched(stub, fresh_copies(base[: args.batch]), args.batch)  # warm the path
        modes: list[tuple[str, Callable[[list[scoring_pb2.Transaction]], Awaitable[None]]]] = [
            ("Score, 1 in flight", partial(_serial, stub)),
            (f"Score, {args.batch} concurrent", partial(_concurrent, stub, width=args.batch)),
            (f"ScoreBatch of {args.batch}", partial(_batched, stub, size=args.batch)),
        ]
        for _ in range(args.rounds):
            for name, run in modes:
                txs = fresh_copies(base)
                start = time.perf_counter()
                await run(txs)
                rates[name].append(len(txs) / (time.perf_counter() - start))
    return rates


def main(argv: Sequence[str] | None = None) -> int:
    """Print the median transactions/s of each mode and the batch's gain."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    rates = asyncio.run(measure(args))
    medians = {name: statistics.median(r) for name, r in rates.items()}
    serial = medians["Score, 1 in flight"]
    print("| mode | transactions/s (median of rounds) | vs Score, 1 in flight |")
    print("|---|---|---|")
    for name, value in medians.items():
        print(f"| {name} | {value:,.0f} | {value / serial:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
