"""What persistent connections buy: each downstream call of the scoring path on a connection held
open (as the orchestrator does) against a fresh connection per call, on real servers.

Usage: ``python -m loadtests.connection_reuse [--calls 300]`` (starts Redis, NATS and Triton on free
loopback ports, with a tiny stage-2-shaped model, and a NATS responder in this process).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import nats
import numpy as np
import redis.asyncio as aioredis
from nats.aio.msg import Msg
from tritonclient.grpc import InferInput
from tritonclient.grpc.aio import InferenceServerClient

from cascade.features import SEQUENCE_LEN, TOKEN_DIM
from cascade.model_registry import load_registry
from cascade.settings import DEFAULT_MODEL_DIR
from devstack.servers import NatsServer, RedisServer, TritonServer


async def _time_calls(call: Callable[[], Awaitable[object]], n: int) -> float:
    """Median milliseconds of ``n`` sequential calls (after 20 warm-up calls)."""
    for _ in range(20):
        await call()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


async def measure(calls: int) -> list[tuple[str, float, float]]:
    """(hop, persistent ms, fresh-connection ms) per downstream hop."""
    registry = load_registry(DEFAULT_MODEL_DIR)
    sequence = np.zeros((1, SEQUENCE_LEN, TOKEN_DIM), dtype=np.float32)
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        async with (
            RedisServer(log_dir=logs) as redis_server,
            NatsServer(log_dir=logs) as nats_server,
            TritonServer(registry.stage2_path, log_dir=logs) as triton,
        ):
            pooled = aioredis.Redis.from_url(redis_server.url)

            async def redis_pipeline(client: aioredis.Redis) -> None:
                pipe = client.pipeline(transaction=False)
                pipe.get("out:x")
                pipe.lrange("feat:x", 0, 63)
                await pipe.execute()

            async def redis_fresh() -> None:
                client = aioredis.Redis.from_url(redis_server.url)
                try:
                    await redis_pipeline(client)
                finally:
                    await client.aclose()

            rows.append(
                (
                    "Redis pipeline (GET + LRANGE)",
                    await _time_calls(lambda: redis_pipeline(pooled), calls),
                    await _time_calls(redis_fresh, calls),
                )
            )
            await pooled.aclose()

            responder = await nats.connect(nats_server.url)

            async def echo(msg: Msg) -> None:
                await msg.respond(b"ok")

            await responder.subscribe("reuse.echo", cb=echo)
            held = await nats.connect(nats_server.url)

            async def nats_fresh() -> None:
                nc = await nats.connect(nats_server.url)
                try:
                    await nc.request("reuse.echo", b"x", timeout=1)
                finally:
                    await nc.close()

            rows.append(
                (
                    "NATS request-reply",
                    await _time_calls(lambda: held.request("reuse.echo", b"x", timeout=1), calls),
                    await _time_calls(nats_fresh, calls),
                )
            )
            await held.close()
            await responder.close()

            def infer_input() -> list[InferInput]:
                tensor = InferInput("sequence", list(sequence.shape), "FP32")
                tensor.set_data_from_numpy(sequence)
                return [tensor]

            channel = InferenceServerClient(triton.grpc_url)

            async def triton_fresh() -> None:
                client = InferenceServerClient(triton.grpc_url)
                try:
                    await client.infer("fraud_heavy", infer_input())
                finally:
                    await client.close()

            rows.append(
                (
                    "Triton infer (batch 1)",
                    await _time_calls(lambda: channel.infer("fraud_heavy", infer_input()), calls),
                    await _time_calls(triton_fresh, calls),
                )
            )
            await channel.close()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table of medians."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args(argv)
    rows = asyncio.run(measure(args.calls))
    print("| hop | persistent, median ms | new connection per call, median ms | ratio |")
    print("|---|---|---|---|")
    for hop, held, fresh in rows:
        print(f"| {hop} | {held:.3f} | {fresh:.3f} | {fresh / held:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
