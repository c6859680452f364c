"""Fixtures for the cascade's end-to-end tests: artifacts whose policy escalates everything (so
stage 2 always runs), a Triton serving the real stage-2 model, and the cascade as processes."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from pydantic import SecretStr

from cascade.model_registry import load_registry
from cascade.settings import (
    DEFAULT_MODEL_DIR,
    DecisionLogSettings,
    NatsSettings,
    PseudonymSettings,
    RedisSettings,
    ServerSettings,
    Settings,
    TritonSettings,
)
from cascade.v1 import scoring_pb2, scoring_pb2_grpc
from devstack.servers import ManagedProcess, RedisServer, TritonServer, free_port
from devstack.stack import orchestrator_process, service_env, worker_process
from tests.conftest import TEST_PSEUDONYM_ENV, TEST_PSEUDONYM_KEY, make_wire_transaction


def new_request(**overrides: object) -> scoring_pb2.ScoreRequest:
    """A valid request with a fresh transaction id (so no test sees another's cache entry)."""
    fields: dict[str, object] = {"transaction_id": f"tx-{uuid.uuid4().hex[:16]}"}
    fields.update(overrides)
    return scoring_pb2.ScoreRequest(transaction=make_wire_transaction(**fields))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the committed artifacts whose policy escalates every score, so stage 2 runs."""
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(DEFAULT_MODEL_DIR, root, dirs_exist_ok=True)
    registry = json.loads((root / "registry.json").read_text())
    policy = json.loads((root / registry["policy"]).read_text())
    policy.update(version="policy-escalate-all", escalate_low=0.0, escalate_high=1.0)
    (root / registry["policy"]).write_text(json.dumps(policy))
    return root


@pytest_asyncio.fixture(scope="session")
async def heavy_triton(model_dir: Path, server_log_dir: Path) -> AsyncIterator[TritonServer]:
    """Triton serving the real stage-2 model from the registry."""
    registry = load_registry(model_dir)
    async with TritonServer(
        registry.stage2_path,
        model_name=registry.stage2.triton_model or "",
        model_version=registry.stage2.triton_version or 1,
        log_dir=server_log_dir / "triton-real",
    ) as server:
        yield server


def triton_for(model_dir: Path, log_dir: Path, *, delay_ms: float = 0.0) -> TritonServer:
    """A Triton (not started) serving ``model_dir``'s stage-2 model; every batch sleeps
    ``delay_ms`` first (a slow stage 2)."""
    registry = load_registry(model_dir)
    return TritonServer(
        registry.stage2_path,
        model_name=registry.stage2.triton_model or "",
        model_version=registry.stage2.triton_version or 1,
        delay_ms=delay_ms,
        log_dir=log_dir,
    )


def settings_for(
    model_dir: Path, redis_url: str, nats_url: str, triton_url: str, **budget: float
) -> Settings:
    """Settings of an in-process orchestrator on the given servers; its decision log spools
    into a temporary folder of its own."""
    return Settings(
        model_dir=model_dir,
        decision_log=DecisionLogSettings(
            spool_dir=Path(tempfile.mkdtemp(prefix="cascade-test-spool-"))
        ),
        redis=RedisSettings(url=redis_url),
        nats=NatsSettings(url=nats_url, subject_prefix=f"t{uuid.uuid4().hex[:8]}"),
        triton=TritonSettings(url=triton_url),
        server=ServerSettings(port=0, drain_s=1.0),
        pseudonym=PseudonymSettings(key=SecretStr(TEST_PSEUDONYM_KEY)),
        **({"budget": budget} if budget else {}),  # type: ignore[arg-type]
    )


@asynccontextmanager
async def cascade_processes(
    model_dir: Path,
    log_dir: Path,
    *,
    redis_url: str,
    nats_url: str,
    triton_url: str,
    workers: int = 1,
    wait_serving: bool = True,
    extra_env: dict[str, str] | None = None,
    port: int | None = None,
) -> AsyncIterator[tuple[scoring_pb2_grpc.ScoringServiceStub, grpc.aio.Channel, ManagedProcess]]:
    """Workers and the orchestrator as their own processes (as ``cascade up`` runs them) against
    the given servers; yields a stub, its warm channel, and the orchestrator process. The
    orchestrator listens on ``port`` (default: a free one), for tests that open more channels,
    and hashes ids with the session's key (``tests.conftest.TEST_PSEUDONYMS``);
    a ``CASCADE_METRICS_PORT`` in ``extra_env`` is the orchestrator's alone."""
    port = port or free_port()
    env = service_env(
        model_dir=model_dir,
        redis_url=redis_url,
        nats_url=nats_url,
        triton_url=triton_url,
        grpc_port=port,
        extra={
            "CASCADE_NATS__SUBJECT_PREFIX": f"t{uuid.uuid4().hex[:8]}",
            "CASCADE_SERVER__DRAIN_S": "3",
            "CASCADE_DECISION_LOG__SPOOL_DIR": str(log_dir / "decision-spool"),
            **TEST_PSEUDONYM_ENV,
            **(extra_env or {}),
        },
    )
    worker_env = {k: v for k, v in env.items() if k != "CASCADE_METRICS_PORT"}
    log_dir.mkdir(parents=True, exist_ok=True)
    async with AsyncExitStack() as stack:
        for i in range(workers):
            await stack.enter_async_context(worker_process(f"worker-{i}", worker_env, log_dir))
        orchestrator = await stack.enter_async_context(
            orchestrator_process(env, log_dir, wait_serving=wait_serving)
        )
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
        await asyncio.wait_for(channel.channel_ready(), timeout=5)
        yield scoring_pb2_grpc.ScoringServiceStub(channel), channel, orchestrator


@asynccontextmanager
async def cascade_with_own_redis(
    model_dir: Path, log_dir: Path, *, nats_url: str, triton_url: str
) -> AsyncIterator[tuple[scoring_pb2_grpc.ScoringServiceStub, RedisServer]]:
    """:func:`cascade_processes` on a Redis of its own, which the test may stop, stall or kill;
    yields the stub and that Redis."""
    async with (
        RedisServer(log_dir=log_dir / "redis") as redis,
        cascade_processes(
            model_dir,
            log_dir / "logs",
            redis_url=redis.url,
            nats_url=nats_url,
            triton_url=triton_url,
        ) as (stub, _, _),
    ):
        yield stub, redis
