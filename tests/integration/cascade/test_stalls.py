"""A stalled or killed screening worker, and dependencies that keep failing, on the real servers.

The workers and the orchestrator run as their own processes, as ``cascade up`` starts them; a
worker is frozen with SIGSTOP (alive and connected, so NATS keeps routing to it) or killed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from cascade.v1 import scoring_pb2, scoring_pb2_grpc
from devstack.servers import ManagedProcess, NatsServer, RedisServer, TritonServer, free_port
from devstack.stack import orchestrator_process, service_env, worker_process
from loadtests.cpu import process_cpu_s
from tests.conftest import TEST_PSEUDONYM_ENV
from tests.integration.cascade.conftest import new_request, triton_for

pytestmark = pytest.mark.integration

R = scoring_pb2
DEADLINE_S = 0.050
STAGE1_CAP_US = 15_000  # budget.stage1_ms
REDIS_CAP_US = 5_000  # budget.redis_ms


@dataclass
class Stack:
    stub: scoring_pb2_grpc.ScoringServiceStub
    orchestrator: ManagedProcess
    workers: list[ManagedProcess]
    metrics_port: int


@asynccontextmanager
async def stack(
    model_dir: Path,
    log_dir: Path,
    *,
    redis_url: str,
    nats_url: str,
    triton_url: str,
    workers: int,
    extra_env: dict[str, str] | None = None,
) -> AsyncIterator[Stack]:
    port, metrics_port = free_port(), free_port()
    env = service_env(
        model_dir=model_dir,
        redis_url=redis_url,
        nats_url=nats_url,
        triton_url=triton_url,
        grpc_port=port,
        extra={
            "CASCADE_NATS__SUBJECT_PREFIX": f"t{uuid.uuid4().hex[:8]}",
            **TEST_PSEUDONYM_ENV,
            **(extra_env or {}),
        },
    )
    log_dir.mkdir(parents=True, exist_ok=True)
    async with AsyncExitStack() as exits:
        procs = [
            await exits.enter_async_context(worker_process(f"worker-{i}", env, log_dir))
            for i in range(workers)
        ]
        orchestrator = await exits.enter_async_context(
            orchestrator_process(
                {**env, "CASCADE_METRICS_PORT": str(metrics_port)},
                log_dir,
                wait_serving=workers > 0,
            )
        )
        channel = await exits.enter_async_context(grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
        await asyncio.wait_for(channel.channel_ready(), timeout=5)
        try:
            yield Stack(
                scoring_pb2_grpc.ScoringServiceStub(channel), orchestrator, procs, metrics_port
            )
        finally:
            for proc in procs:  # a frozen process cannot take its SIGTERM
                if proc.pid is not None:
                    with_suppressed_kill(proc.pid, signal.SIGCONT)


def with_suppressed_kill(pid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, sig)


def pid_of(proc: ManagedProcess | RedisServer) -> int:
    assert proc.pid is not None
    return proc.pid


async def score_many(
    stub: scoring_pb2_grpc.ScoringServiceStub, n: int
) -> list[scoring_pb2.ScoreResponse]:
    replies = []
    for _ in range(n):
        # A late answer raises DEADLINE_EXCEEDED: gRPC's client ends the call at its deadline
        # even when the answer is in the socket. Timing the call here as well measured this
        # process's own wake-up after the answer (51 ms in a CI run, the answer in time).
        replies.append(await stub.Score(new_request(), timeout=DEADLINE_S))
    return replies


async def warm(stub: scoring_pb2_grpc.ScoringServiceStub, n: int = 20) -> None:
    replies = await score_many(stub, n)
    assert not any(r.degraded for r in replies[-5:])


async def until_members(s: Stack, live: int) -> None:
    """Wait until the orchestrator has heard ``live`` workers' heartbeats."""
    for _ in range(60):
        if metric(s.metrics_port, "cascade_screening_members", 'state="live"') == live:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the orchestrator did not hear {live} workers within 3 s")


@dataclass
class Servers:
    redis: RedisServer
    nats: NatsServer
    triton: TritonServer


@pytest.fixture
def servers(
    redis_server: RedisServer, nats_server: NatsServer, heavy_triton: TritonServer
) -> Servers:
    """The session's Redis, NATS and Triton (real, on free loopback ports)."""
    return Servers(redis_server, nats_server, heavy_triton)


@asynccontextmanager
async def warm_stack(
    model_dir: Path,
    log_dir: Path,
    servers: Servers,
    *,
    workers: int,
    redis_url: str | None = None,
    triton_url: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> AsyncIterator[Stack]:
    """:func:`stack` on ``servers`` (or the given Redis/Triton), warmed, every worker heard."""
    async with stack(
        model_dir,
        log_dir,
        redis_url=redis_url or servers.redis.url,
        nats_url=servers.nats.url,
        triton_url=triton_url or servers.triton.grpc_url,
        workers=workers,
        extra_env=extra_env,
    ) as s:
        await warm(s.stub)
        if workers > 1 and (extra_env or {}).get("CASCADE_HEDGING__ENABLED") != "false":
            await until_members(s, workers)
        yield s


async def useful_again(stub: scoring_pb2_grpc.ScoringServiceStub, since_s: float) -> None:
    """Poll until an undegraded answer comes; fail if that takes 1 s from ``since_s`` (the
    target: useful answers within 1 s of a dependency's return)."""
    while True:
        reply = await stub.Score(new_request(), timeout=DEADLINE_S)
        if not reply.degraded:
            return
        assert time.monotonic() - since_s < 1.0, "no useful answer within 1 s of the return"
        await asyncio.sleep(0.01)


def metric(port: int, name: str, labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    for line in text.splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{labels}}} not in /metrics")


async def serving_worker(s: Stack, calls: int = 200) -> ManagedProcess:
    """A worker that answers calls: with ``hedging.routing=pack`` the only one (its preferred
    worker), round robin either; found by the CPU each worker spends on a run of calls."""
    before = [process_cpu_s(pid_of(w)) for w in s.workers]
    await score_many(s.stub, calls)
    spent = [process_cpu_s(pid_of(w)) - cpu for w, cpu in zip(s.workers, before, strict=True)]
    return s.workers[spent.index(max(spent))]


async def test_one_frozen_worker_of_two_costs_no_default_answers(
    model_dir: Path, servers: Servers, tmp_path: Path
) -> None:
    async with warm_stack(model_dir, tmp_path, servers, workers=2) as s:
        frozen = await serving_worker(s)  # freezing the idle spare would test nothing
        os.kill(pid_of(frozen), signal.SIGSTOP)
        replies = await score_many(s.stub, 100)
        defaults = [r for r in replies if r.decided_by == R.DECIDED_BY_DEFAULT]
        hedges = {
            o: metric(s.metrics_port, "cascade_screening_hedges_total", f'outcome="{o}"')
            for o in ("sent", "won", "skipped")
        }
        log = s.orchestrator.log_path.read_text()
        assert not defaults, ([r.timings.stage1_us for r in defaults], hedges, log[-3000:])
        # The frozen worker was noticed (a hedge overtook it) and is routed around: no call
        # waited out the stage-1 cap, as every other one does without hedging (next test).
        assert hedges["won"] >= 1
        assert max(r.timings.stage1_us for r in replies) < STAGE1_CAP_US * 2 / 3
        # Out of rotation: suspect, or, once no heartbeat came for member_ttl_s (1 s: the 100
        # calls take that long on a slow host), dropped from the table altogether.
        assert "stopped answering" in log
        log = s.orchestrator.log_path.read_text()
        dropped = "went quiet" in log
        members = {
            state: metric(s.metrics_port, "cascade_screening_members", f'state="{state}"')
            for state in ("live", "suspect")
        }
        assert members == {"live": 1, "suspect": 0 if dropped else 1}, (members, log[-2000:])
        os.kill(pid_of(frozen), signal.SIGCONT)
        await until_members(s, 2)  # a heartbeat or two after it resumed
        log = s.orchestrator.log_path.read_text()
        assert log.count(" joined") == 3 if dropped else "is answering again" in log


async def test_without_hedging_a_frozen_worker_turns_calls_into_defaults(
    model_dir: Path, servers: Servers, tmp_path: Path
) -> None:
    # The comparison the previous test is measured against: the queue group alone.
    async with warm_stack(
        model_dir,
        tmp_path,
        servers,
        workers=2,
        extra_env={"CASCADE_HEDGING__ENABLED": "false", "CASCADE_BREAKER__ENABLED": "false"},
    ) as s:
        os.kill(pid_of(s.workers[0]), signal.SIGSTOP)
        frozen = time.monotonic()
        replies = await score_many(s.stub, 40)
        timeouts = [r for r in replies if list(r.reasons) == [R.REASON_STAGE1_TIMEOUT]]
        assert len(timeouts) >= 8  # about half; 8 of 40 leaves room for NATS's randomness
        # The NATS server pings every client each second and drops one that misses two pings,
        # so the frozen worker leaves the queue group after ~3 s, hedging or not.
        await asyncio.sleep(max(0.0, frozen + 4.0 - time.monotonic()))
        replies = await score_many(s.stub, 40)
        assert not [r for r in replies if r.degraded]


async def test_killed_worker_is_replaced_by_the_other_at_once(
    model_dir: Path, servers: Servers, tmp_path: Path
) -> None:
    async with warm_stack(model_dir, tmp_path, servers, workers=2) as s:
        os.kill(pid_of(await serving_worker(s)), signal.SIGKILL)
        replies = await score_many(s.stub, 50)
        assert not [r for r in replies if r.decided_by == R.DECIDED_BY_DEFAULT]


async def test_stage1_breaker_opens_on_a_frozen_only_worker_and_closes_when_it_resumes(
    model_dir: Path, servers: Servers, tmp_path: Path
) -> None:
    async with warm_stack(model_dir, tmp_path, servers, workers=1) as s:
        os.kill(pid_of(s.workers[0]), signal.SIGSTOP)
        replies = await score_many(s.stub, 40)
        assert all(r.decided_by == R.DECIDED_BY_DEFAULT and r.degraded for r in replies)
        assert list(replies[0].reasons) == [R.REASON_STAGE1_TIMEOUT]
        skipped = [r for r in replies if list(r.reasons) == [R.REASON_STAGE1_UNAVAILABLE]]
        # Once 18 of the last 20 failed, calls skip stage 1 at once instead of waiting out its
        # 15 ms each time (the occasional half-open probe still waits).
        assert len(skipped) >= 15
        assert all(r.timings.stage1_us < 1000 for r in skipped)
        assert metric(s.metrics_port, "cascade_breaker_state", 'dependency="screening"') >= 1
        os.kill(pid_of(s.workers[0]), signal.SIGCONT)
        await useful_again(s.stub, time.monotonic())
        assert metric(s.metrics_port, "cascade_breaker_state", 'dependency="screening"') == 0


async def test_redis_breaker_opens_on_a_frozen_redis_and_closes_when_it_resumes(
    model_dir: Path, servers: Servers, tmp_path: Path
) -> None:
    async with (
        RedisServer(log_dir=tmp_path / "redis") as frozen,
        warm_stack(model_dir, tmp_path, servers, workers=1, redis_url=frozen.url) as s,
    ):
        os.kill(pid_of(frozen), signal.SIGSTOP)
        try:
            replies = await score_many(s.stub, 40)  # 18 of the last 20 failing trips it
        finally:
            os.kill(pid_of(frozen), signal.SIGCONT)
        resumed = time.monotonic()
        assert all(R.REASON_FEATURES_UNAVAILABLE in r.reasons for r in replies)
        assert all(r.decided_by != R.DECIDED_BY_DEFAULT for r in replies)  # still scored
        assert replies[0].timings.redis_us >= REDIS_CAP_US * 0.5  # waited (~its cap), not refused
        skipped = [r for r in replies if r.timings.redis_us < 500]
        assert len(skipped) >= 15
        await useful_again(s.stub, resumed)


async def test_stage2_breaker_skips_a_slow_triton_at_once(
    model_dir: Path, redis_server: RedisServer, nats_server: NatsServer, tmp_path: Path
) -> None:
    async with (
        triton_for(model_dir, tmp_path / "triton-slow", delay_ms=300) as slow,
        stack(
            model_dir,
            tmp_path,
            redis_url=redis_server.url,
            nats_url=nats_server.url,
            triton_url=slow.grpc_url,
            workers=1,
        ) as s,
    ):
        replies = await score_many(s.stub, 40)
        assert all(r.decided_by == R.DECIDED_BY_STAGE1 and r.escalated for r in replies)
        assert R.REASON_STAGE2_TIMEOUT in replies[0].reasons
        skipped = [r for r in replies if list(r.reasons) == [R.REASON_STAGE2_UNAVAILABLE]]
        assert len(skipped) >= 15
        # Not asked: no time spent in stage 2, where each time-out spent what the budget left.
        assert all(r.timings.stage2_us < 1000 for r in skipped)
        assert replies[0].timings.stage2_us > 20_000
        assert metric(s.metrics_port, "cascade_breaker_state", 'dependency="heavy"') >= 1
