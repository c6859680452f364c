"""Fallbacks under failure, timed from outside: the worker and the orchestrator run as their own
processes (``python -m stages.screening``, ``python -m orchestrator`` on uvloop), exactly as
``cascade up`` starts them, so a measured time is the caller's time and nothing else's.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cascade.v1 import scoring_pb2, scoring_pb2_grpc
from devstack.servers import NatsServer, RedisServer, TritonServer
from tests.integration.cascade.conftest import (
    cascade_processes,
    cascade_with_own_redis,
    new_request,
    triton_for,
)

pytestmark = pytest.mark.integration

R = scoring_pb2
# Every fallback must come back well inside this, whatever failed (no multi-second stalls).
FAST_S = 0.050
REDIS_CAP_US = 5_000  # budget.redis_ms


async def timed_score(
    stub: scoring_pb2_grpc.ScoringServiceStub, timeout_s: float
) -> tuple[scoring_pb2.ScoreResponse, float]:
    start = time.monotonic()
    reply = await stub.Score(new_request(), timeout=timeout_s)
    return reply, time.monotonic() - start


async def test_slow_then_stopped_stage2_falls_back_to_stage1_in_time(
    model_dir: Path, redis_server: RedisServer, nats_server: NatsServer, tmp_path: Path
) -> None:
    async with (
        triton_for(model_dir, tmp_path / "triton-slow", delay_ms=300) as slow,
        cascade_processes(
            model_dir,
            tmp_path / "logs",
            redis_url=redis_server.url,
            nats_url=nats_server.url,
            triton_url=slow.grpc_url,
            # The time-out path itself: the breaker would soon skip a Triton this slow (see
            # test_stalls.py), answering faster still.
            extra_env={"CASCADE_BREAKER__ENABLED": "false"},
        ) as (stub, _, _),
    ):
        # The first Score of a fresh process pays lazy initialisation (~ms); time the rest.
        warm, _ = await timed_score(stub, 1.0)
        assert R.REASON_STAGE2_TIMEOUT in warm.reasons
        deadline_s = 0.040
        for _ in range(5):
            reply, elapsed_s = await timed_score(stub, deadline_s)
            assert R.REASON_STAGE2_TIMEOUT in reply.reasons
            assert reply.decided_by == R.DECIDED_BY_STAGE1
            assert reply.degraded and reply.escalated
            assert reply.score == pytest.approx(reply.stage1_score)
            assert elapsed_s < deadline_s

        await slow.stop()  # Triton goes away under a running orchestrator
        for _ in range(3):
            reply, elapsed_s = await timed_score(stub, 1.0)
            assert list(reply.reasons) == [R.REASON_STAGE2_UNAVAILABLE]
            assert reply.decided_by == R.DECIDED_BY_STAGE1
            assert elapsed_s < FAST_S


async def test_no_screening_worker_answers_labelled_default_fast(
    model_dir: Path,
    redis_server: RedisServer,
    nats_server: NatsServer,
    heavy_triton: TritonServer,
    tmp_path: Path,
) -> None:
    async with cascade_processes(
        model_dir,
        tmp_path,
        redis_url=redis_server.url,
        nats_url=nats_server.url,
        triton_url=heavy_triton.grpc_url,
        workers=0,
        wait_serving=False,
    ) as (stub, channel, _):
        for _ in range(3):
            reply, elapsed_s = await timed_score(stub, 1.0)
            assert reply.decided_by == R.DECIDED_BY_DEFAULT
            assert list(reply.reasons) == [R.REASON_STAGE1_UNAVAILABLE]
            assert reply.decision == R.DECISION_REVIEW and reply.degraded
            # NATS answers "no responders" at once: we do not wait out the 15 ms stage-1 cap.
            assert reply.timings.stage1_us < 2_000
            assert elapsed_s < FAST_S
        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_redis_stopped_still_answers_without_a_stall(
    model_dir: Path, nats_server: NatsServer, heavy_triton: TritonServer, tmp_path: Path
) -> None:
    async with cascade_with_own_redis(
        model_dir, tmp_path, nats_url=nats_server.url, triton_url=heavy_triton.grpc_url
    ) as (stub, doomed):
        reply, _ = await timed_score(stub, 1.0)
        assert not reply.degraded
        await doomed.stop()
        for _ in range(3):
            reply, elapsed_s = await timed_score(stub, 1.0)
            assert elapsed_s < FAST_S
            assert reply.timings.redis_us < REDIS_CAP_US + 2_000  # refused: no wait at all
            assert R.REASON_CACHE_UNAVAILABLE in reply.reasons
            assert R.REASON_FEATURES_UNAVAILABLE in reply.reasons
            # The policy's features-unavailable section decides, and it does not escalate.
            assert reply.decided_by == R.DECIDED_BY_STAGE1 and not reply.escalated


async def test_sigterm_drains_in_flight_calls_then_exits_cleanly(
    model_dir: Path,
    redis_server: RedisServer,
    nats_server: NatsServer,
    heavy_triton: TritonServer,
    tmp_path: Path,
) -> None:
    async with cascade_processes(
        model_dir,
        tmp_path,
        redis_url=redis_server.url,
        nats_url=nats_server.url,
        triton_url=heavy_triton.grpc_url,
        extra_env={"CASCADE_SERVER__SHUTDOWN_DELAY_S": "0"},
    ) as (stub, _, orchestrator):
        # Four 1000-item batches (two run at once) keep calls in flight for a few hundred ms.
        batch = scoring_pb2.ScoreBatchRequest(
            transactions=[new_request().transaction for _ in range(1000)]
        )
        answered_at: list[float] = []

        async def call_batch() -> scoring_pb2.ScoreBatchResponse:
            reply: scoring_pb2.ScoreBatchResponse = await stub.ScoreBatch(batch, timeout=10.0)
            answered_at.append(time.monotonic())
            return reply

        calls = [asyncio.ensure_future(call_batch()) for _ in range(4)]
        await asyncio.sleep(0.05)
        stopping = asyncio.ensure_future(orchestrator.stop())  # SIGTERM, waits for the exit
        await asyncio.sleep(0.1)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Score(new_request(), timeout=1.0)
        refused_at = time.monotonic()
        replies = await asyncio.gather(*calls, return_exceptions=True)
        returncode = await stopping
    failed = [r for r in replies if not isinstance(r, scoring_pb2.ScoreBatchResponse)]
    assert failed == [], "every call sent before SIGTERM must be answered during the drain"
    assert all(
        len(r.results) == 1000 for r in replies if isinstance(r, scoring_pb2.ScoreBatchResponse)
    )
    # Draining, not still accepting: a new call was refused while earlier ones were in flight.
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert max(answered_at) > refused_at
    assert returncode == 0


async def test_stalled_redis_is_cut_off_without_a_stall(
    model_dir: Path, nats_server: NatsServer, heavy_triton: TritonServer, tmp_path: Path
) -> None:
    async with cascade_with_own_redis(
        model_dir, tmp_path, nats_url=nats_server.url, triton_url=heavy_triton.grpc_url
    ) as (stub, slow):
        admin = aioredis.Redis.from_url(slow.url)
        try:
            # DEBUG SLEEP blocks the whole server: every lookup meets a Redis that is there
            # but silent, the case the millisecond timeouts exist for.
            stall = asyncio.ensure_future(admin.execute_command("DEBUG", "SLEEP", "1"))  # type: ignore[no-untyped-call]
            await asyncio.sleep(0.05)
            for _ in range(3):
                reply, elapsed_s = await timed_score(stub, 1.0)
                assert elapsed_s < FAST_S
                # Silent Redis: the lookup waits its 5 ms cap (it was not refused at once), not
                # the 1 s sleep. The loop's timers run on libuv's cached clock, so the cut-off
                # can land up to ~1 ms early.
                assert REDIS_CAP_US * 0.5 <= reply.timings.redis_us < REDIS_CAP_US + 2_000
                assert R.REASON_CACHE_UNAVAILABLE in reply.reasons
                assert reply.decided_by == R.DECIDED_BY_STAGE1 and not reply.escalated
            await stall
        finally:
            await admin.aclose()
