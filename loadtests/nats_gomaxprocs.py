"""What the Go runtime's processor count costs a NATS request-reply: two local nats-servers, one
with ``GOMAXPROCS=1`` and one with Go's default (one per core), each with an echo responder, asked
one request at a time, alternating between them; the servers' CPU per round trip from ``/proc``.

Usage: ``python -m loadtests.nats_gomaxprocs [--n 3000] [--payload-bytes 200]``
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from devstack.servers.nats import NatsServer
from loadtests.cpu import process_cpu_s
from loadtests.histogram import percentile_of_sorted


async def measure(n: int, payload: bytes) -> dict[str, tuple[list[float], float]]:
    """By variant: milliseconds per round trip and the server's CPU ms per round trip."""
    async with NatsServer(go_max_procs=1) as one, NatsServer(go_max_procs=None) as default:
        variants = {"GOMAXPROCS=1": one, "Go default": default}
        clients = []
        for server in variants.values():
            responder = await nats.connect(server.url)
            requester = await nats.connect(server.url)

            async def echo(msg: Msg, responder: NatsClient = responder) -> None:
                await responder.publish(msg.reply, msg.data)

            await responder.subscribe("echo", queue="workers", cb=echo)
            await responder.flush()
            clients.append((responder, requester))
        try:
            pairs = [(name, client[1]) for name, client in zip(variants, clients, strict=True)]
            for _, requester in pairs:  # warm-up
                for _ in range(100):
                    await requester.request("echo", payload, timeout=2)
            pids = {name: server.pid for name, server in variants.items()}
            start_cpu = {name: process_cpu_s(pid) for name, pid in pids.items() if pid is not None}
            times: dict[str, list[float]] = {name: [] for name in variants}
            for i in range(n):
                for name, requester in pairs if i % 2 else pairs[::-1]:
                    started = time.perf_counter()
                    await requester.request("echo", payload, timeout=2)
                    times[name].append((time.perf_counter() - started) * 1000)
                await asyncio.sleep(0.001)
            return {
                name: (times[name], (process_cpu_s(pid) - start_cpu[name]) * 1000 / n)
                for name, pid in pids.items()
                if pid is not None
            }
        finally:
            for responder, requester in clients:
                await requester.close()
                await responder.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Print p50 / p99 and the server's CPU per round trip for each variant."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000, help="round trips through each server")
    parser.add_argument("--payload-bytes", type=int, default=200, help="request size")
    args = parser.parse_args(argv)
    if args.n < 1 or args.payload_bytes < 0:
        parser.error("--n must be positive and --payload-bytes not negative")
    results = asyncio.run(measure(args.n, b"x" * args.payload_bytes))
    for name, (samples, cpu_ms) in results.items():
        samples.sort()
        p50, p99 = (percentile_of_sorted(samples, p) for p in (50, 99))
        print(
            f"{name:12s}: p50 {p50:.3f} ms, p99 {p99:.3f} ms, server CPU {cpu_ms:.4f} ms/round trip"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
