"""The generator's connections reach every process sharing the target's port (SO_REUSEPORT),
in equal shares: two real gRPC server processes on one loopback port."""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from devstack.servers import free_port
from loadtests.client import ScoringClient
from loadtests.connections import listeners, owners

pytestmark = pytest.mark.integration

# A gRPC server with only the health service, on a reuse-port socket; prints once it serves.
_SERVER = """
import asyncio, sys
import grpc
from grpc_health.v1 import health, health_pb2_grpc

async def main():
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port("127.0.0.1:" + sys.argv[1])
    await server.start()
    print("serving", flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""


@pytest_asyncio.fixture
async def shared_port() -> AsyncIterator[tuple[int, list[int]]]:
    """Two server processes on one port: the port and their pids."""
    port = free_port()
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _SERVER, str(port), stdout=asyncio.subprocess.PIPE
        )
        for _ in range(2)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            async with asyncio.timeout(30):
                assert await proc.stdout.readline() == b"serving\n"
        yield port, sorted(proc.pid for proc in procs)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def test_listeners_are_the_processes_sharing_the_port(
    shared_port: tuple[int, list[int]],
) -> None:
    port, pids = shared_port
    assert listeners(port) == pids
    assert owners(port, pids) == {}  # no connection yet


async def test_the_client_holds_an_equal_share_of_connections_on_each_process(
    shared_port: tuple[int, list[int]],
) -> None:
    port, pids = shared_port
    async with ScoringClient(f"127.0.0.1:{port}", channels=3) as client:
        # 3 asked for, 2 processes: 2 each, however the kernel's hash fell.
        assert client.connections_by_process == {pids[0]: 2, pids[1]: 2}
        # The connections closed on the way go once gRPC has shut them (asynchronously).
        wanted = {pids[0]: 2, pids[1]: 2}
        for _ in range(100):
            held = Counter(owners(port, pids).values())
            if held == wanted:
                break
            await asyncio.sleep(0.05)
        assert held == wanted
        await client.health_check()


async def test_one_process_on_the_port_is_not_spread_over() -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SERVER, str(port), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            assert await proc.stdout.readline() == b"serving\n"
        async with ScoringClient(f"127.0.0.1:{port}", channels=2) as client:
            assert client.connections_by_process == {}
            assert Counter(owners(port, [proc.pid]).values()) == {proc.pid: 2}
    finally:
        proc.kill()
        await proc.wait()
