"""Fallbacks under failure, timed from outside: the worker and the orchestrator run as their own
processes (``python -m stages.screening``, ``python -m orchestrator`` on uvloop), exactly as
``cascade up`` starts them, so a measured time is the caller's time and nothing else's.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cascade.model_registry import load_registry
from cascade.servers import NatsServer, RedisServer, TritonServer
from cascade.v1 import scoring_pb2, scoring_pb2_grpc
from tests.integration.cascade.conftest import cascade_processes, new_request

pytestmark = pytest.mark.integration

R = scoring_pb2
# Every fallback must come back well inside this, whatever failed (no multi-second stalls).
FAST_S = 0.050


async def timed_score(
    stub: scoring_pb2_grpc.ScoringServiceStub, timeout_s: float
) -> tuple[scoring_pb2.ScoreResponse, float]:
    start = time.monotonic()
    reply = await stub.Score(new_request(), timeout=timeout_s)
    return reply, time.monotonic() - start


async def test_slow_then_stopped_stage2_falls_back_to_stage1_in_time(
    model_dir: Path, redis_server: RedisServer, nats_server: NatsServer, tmp_path: Path
) -> None:
    registry = load_registry(model_dir)
    async with (
        TritonServer(
            registry.stage2_path,
            model_name=registry.stage2.triton_model or "",
            model_version=registry.stage2.triton_version or 1,
            delay_ms=300,
            log_dir=tmp_path / "triton-slow",
        ) as slow,
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
            # NATS answers "no responders" at once: we do not wait out the stage-1 timeout.
            assert elapsed_s < FAST_S
        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_redis_stopped_still_answers_without_a_stall(
    model_dir: Path, nats_server: NatsServer, heavy_triton: TritonServer, tmp_path: Path
) -> None:
    async with (
        RedisServer(log_dir=tmp_path / "redis") as doomed,
        cascade_processes(
            model_dir,
            tmp_path / "logs",
            redis_url=doomed.url,
            nats_url=nats_server.url,
            triton_url=heavy_triton.grpc_url,
        ) as (stub, _, _),
    ):
        reply, _ = await timed_score(stub, 1.0)
        assert not reply.degraded
        await doomed.stop()
        for _ in range(3):
            reply, elapsed_s = await timed_score(stub, 1.0)
            assert elapsed_s < FAST_S
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
    ) as (stub, _, orchestrator):
        calls = [asyncio.ensure_future(stub.Score(new_request(), timeout=2.0)) for _ in range(20)]
        await asyncio.sleep(0.005)
        returncode = await orchestrator.stop()  # SIGTERM, then waits (SIGKILL only past grace)
        replies = await asyncio.gather(*calls, return_exceptions=True)
    failed = [r for r in replies if not isinstance(r, scoring_pb2.ScoreResponse)]
    assert returncode == 0
    assert failed == [], "every call sent before SIGTERM must be answered during the drain"


async def test_stalled_redis_is_cut_off_without_a_stall(
    model_dir: Path, nats_server: NatsServer, heavy_triton: TritonServer, tmp_path: Path
) -> None:
    async with (
        RedisServer(log_dir=tmp_path / "redis") as slow,
        cascade_processes(
            model_dir,
            tmp_path / "logs",
            redis_url=slow.url,
            nats_url=nats_server.url,
            triton_url=heavy_triton.grpc_url,
        ) as (stub, _, _),
    ):
        admin = aioredis.Redis.from_url(slow.url)
        try:
            # DEBUG SLEEP blocks the whole server: every lookup meets a Redis that is there
            # but silent, the case the millisecond timeouts exist for.
            stall = asyncio.ensure_future(admin.execute_command("DEBUG", "SLEEP", "1"))  # type: ignore[no-untyped-call]
            await asyncio.sleep(0.05)
            for _ in range(3):
                reply, elapsed_s = await timed_score(stub, 1.0)
                assert elapsed_s < FAST_S
                assert R.REASON_CACHE_UNAVAILABLE in reply.reasons
                assert reply.decided_by == R.DECIDED_BY_STAGE1 and not reply.escalated
            await stall
        finally:
            await admin.aclose()
