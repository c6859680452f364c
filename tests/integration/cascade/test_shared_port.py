"""Several orchestrator processes on one port (reuse-port), as ``cascade up --orchestrators N``
and the container's supervisor (``CASCADE_SERVER__PROCESSES``) run them, on real servers.

Which process answers a call is the kernel's choice per TCP connection, so the tests open many
fresh connections and read, from outside, each process's own ``/metrics`` (process ``i`` serves
it on the base metrics port + ``i``) to prove that every process answered.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Final

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cascade.v1 import scoring_pb2, scoring_pb2_grpc
from devstack.servers import ManagedProcess, NatsServer, RedisServer, TritonServer, free_port
from devstack.servers._process import port_is_free
from devstack.stack import orchestrator_processes, service_env, worker_process
from tests.conftest import TEST_PSEUDONYM_ENV
from tests.integration.cascade.conftest import new_request

pytestmark = pytest.mark.integration

R = scoring_pb2
PROCESSES: Final = 2
# P(all connections land on one of two processes) = 2 * 2**-CONNECTIONS: never, in practice.
CONNECTIONS: Final = 24
START_TIMEOUT_S: Final = 45.0


def free_port_run(count: int) -> int:
    """A port p with p .. p + count - 1 all free a moment ago (metrics ports base + i)."""
    for _ in range(50):
        base = free_port()
        if base + count - 1 <= 65535 and all(port_is_free(base + i) for i in range(1, count)):
            return base
    raise RuntimeError(f"no run of {count} free ports found")


def answers_counted(metrics_port: int) -> float:
    """``cascade_scores_total`` summed over its labels, read from one process's /metrics."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "cascade_scores"
        for sample in family.samples
        if sample.name == "cascade_scores_total"
    )


async def score_on_fresh_connections(port: int, connections: int) -> list[R.ScoreResponse]:
    """One Score per new channel; a local subchannel pool keeps channels from sharing a TCP
    connection, so each call is a connection the kernel assigns afresh."""
    replies = []
    for _ in range(connections):
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            replies.append(await stub.Score(new_request(), timeout=5.0))
    return replies


def assert_correct(replies: list[R.ScoreResponse]) -> None:
    """Every answer is a real decision of the full cascade (escalate-all policy: stage 2)."""
    for reply in replies:
        assert reply.decision in (R.DECISION_APPROVE, R.DECISION_REVIEW, R.DECISION_DECLINE)
        assert reply.decided_by == R.DECIDED_BY_STAGE2
        assert not reply.degraded and list(reply.reasons) == []


@asynccontextmanager
async def screening_worker(env: dict[str, str], log_dir: Path) -> AsyncIterator[None]:
    # Its metrics would take the orchestrators' base port.
    env = {k: v for k, v in env.items() if k != "CASCADE_METRICS_PORT"}
    async with worker_process("worker-0", env, log_dir):
        yield


def stack_env(
    port: int, metrics_port: int, model_dir: Path, redis: str, nats: str, triton: str
) -> dict[str, str]:
    return service_env(
        model_dir=model_dir,
        redis_url=redis,
        nats_url=nats,
        triton_url=triton,
        grpc_port=port,
        extra={
            "CASCADE_NATS__SUBJECT_PREFIX": f"t{uuid.uuid4().hex[:8]}",
            "CASCADE_SERVER__DRAIN_S": "2",
            "CASCADE_SERVER__SHUTDOWN_DELAY_S": "0.1",
            "CASCADE_METRICS_PORT": str(metrics_port),
            **TEST_PSEUDONYM_ENV,
        },
    )


async def test_two_orchestrator_processes_on_one_port_both_serve(
    model_dir: Path,
    redis_server: RedisServer,
    nats_server: NatsServer,
    heavy_triton: TritonServer,
    tmp_path: Path,
) -> None:
    port, metrics_base = free_port(), free_port_run(PROCESSES)
    env = stack_env(
        port, metrics_base, model_dir, redis_server.url, nats_server.url, heavy_triton.grpc_url
    )
    async with asyncio.timeout(START_TIMEOUT_S + 15), AsyncExitStack() as stack:
        await stack.enter_async_context(screening_worker(env, tmp_path))
        orchestrators = orchestrator_processes(env, tmp_path, PROCESSES)
        await asyncio.gather(*(stack.enter_async_context(p) for p in orchestrators))
        assert len({p.pid for p in orchestrators}) == PROCESSES

        replies = await score_on_fresh_connections(port, CONNECTIONS)

        assert_correct(replies)
        counts = [
            await asyncio.to_thread(answers_counted, metrics_base + i) for i in range(PROCESSES)
        ]
        assert sum(counts) == CONNECTIONS, counts
        assert all(count > 0 for count in counts), f"a process answered nothing: {counts}"
        # Each drains and exits 0 on SIGTERM, as a single process does.
        assert [await p.stop() for p in orchestrators] == [0] * PROCESSES


def supervisor(env: dict[str, str], log_dir: Path) -> ManagedProcess:
    """``python -m orchestrator`` with ``CASCADE_SERVER__PROCESSES`` = 2, ready once both children
    printed SERVING into the (shared) log."""
    log_path = log_dir / "supervisor.log"

    async def ready() -> bool:
        try:
            lines = log_path.read_text().splitlines()
        except FileNotFoundError:
            return False
        return sum(line.strip() == "SERVING" for line in lines) == PROCESSES

    return ManagedProcess(
        "supervisor",
        [sys.executable, "-m", "orchestrator"],
        log_dir=log_dir,
        env={**env, "CASCADE_SERVER__PROCESSES": str(PROCESSES)},
        probe=ready,
        start_timeout_s=START_TIMEOUT_S,
    )


def child_pids(log_path: Path) -> list[int]:
    found = re.search(
        r"supervising \d+ orchestrator processes on \S+ \(pids ([\d ]+)\)", log_path.read_text()
    )
    assert found, log_path.read_text()
    return [int(pid) for pid in found[1].split()]


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_supervisor_serves_with_all_children_and_drains_them_on_sigterm(
    model_dir: Path,
    redis_server: RedisServer,
    nats_server: NatsServer,
    heavy_triton: TritonServer,
    tmp_path: Path,
) -> None:
    port, metrics_base = free_port(), free_port_run(PROCESSES)
    env = stack_env(
        port, metrics_base, model_dir, redis_server.url, nats_server.url, heavy_triton.grpc_url
    )
    async with asyncio.timeout(START_TIMEOUT_S + 15), AsyncExitStack() as stack:
        await stack.enter_async_context(screening_worker(env, tmp_path))
        parent = await stack.enter_async_context(supervisor(env, tmp_path))
        children = child_pids(parent.log_path)

        replies = await score_on_fresh_connections(port, CONNECTIONS)

        assert_correct(replies)
        counts = [
            await asyncio.to_thread(answers_counted, metrics_base + i) for i in range(PROCESSES)
        ]
        assert all(count > 0 for count in counts), f"a child answered nothing: {counts}"
        assert await parent.stop() == 0  # SIGTERM to the group; every child drained and exited 0
        assert not any(running(pid) for pid in children)


async def test_supervisor_exits_non_zero_and_stops_the_rest_when_a_child_dies(
    model_dir: Path,
    redis_server: RedisServer,
    nats_server: NatsServer,
    heavy_triton: TritonServer,
    tmp_path: Path,
) -> None:
    port, metrics_base = free_port(), free_port_run(PROCESSES)
    env = stack_env(
        port, metrics_base, model_dir, redis_server.url, nats_server.url, heavy_triton.grpc_url
    )
    async with asyncio.timeout(START_TIMEOUT_S + 15), AsyncExitStack() as stack:
        await stack.enter_async_context(screening_worker(env, tmp_path))
        parent = await stack.enter_async_context(supervisor(env, tmp_path))
        first, second = child_pids(parent.log_path)
        os.kill(first, signal.SIGKILL)
        async with asyncio.timeout(10):
            assert await parent.wait() == 1
        assert not running(second)
        assert "exited with status -9: stopping the others" in parent.log_tail()
