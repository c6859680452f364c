"""The scoring cascade end to end on real Redis, NATS, Triton and gRPC.

The screening worker and the orchestrator run in this process (over real sockets) so one
in-memory span exporter sees every hop of a trace; the servers are real processes on free
loopback ports.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from cascade.features import decode_history_entry, screening_features
from cascade.model_registry import load_registry
from cascade.settings import (
    Settings,
)
from cascade.v1 import scoring_pb2, scoring_pb2_grpc
from devstack.servers import NatsServer, RedisServer, TritonServer, free_port
from orchestrator.online_store import card_history_key
from orchestrator.server import Orchestrator
from orchestrator.validation import validate_transaction
from stages.screening.model import ScreeningModel
from stages.screening.worker import ScreeningWorker
from tests.conftest import TEST_PSEUDONYMS
from tests.integration.cascade.conftest import new_request, settings_for

pytestmark = pytest.mark.integration

R = scoring_pb2


@dataclass
class Running:
    """A started cascade: the orchestrator, a stub to call it, and the spans it exported."""

    app: Orchestrator
    stub: scoring_pb2_grpc.ScoringServiceStub
    channel: grpc.aio.Channel
    spans: InMemorySpanExporter


@asynccontextmanager
async def running(
    settings: Settings, *, workers: int = 1, wait_serving: bool = True
) -> AsyncIterator[Running]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = load_registry(settings.model_dir)
    async with AsyncExitStack() as stack:
        stack.callback(provider.shutdown)
        for _ in range(workers):
            model = ScreeningModel(registry.stage1_path, version=registry.stage1.version)
            await stack.enter_async_context(
                ScreeningWorker(
                    model,
                    nats_url=settings.nats.url,
                    subject_prefix=settings.nats.subject_prefix,
                    queue_group=settings.nats.queue_group,
                    feature_set=registry.feature_set,
                    tracer=provider.get_tracer("test.worker"),
                )
            )
        app = await stack.enter_async_context(Orchestrator(settings, tracer_provider=provider))
        if wait_serving:
            await app.wait_serving(timeout_s=30)
        channel = await stack.enter_async_context(
            grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        )
        # Callers hold warm channels; a deadline test should not time the TCP/HTTP2 handshake.
        await asyncio.wait_for(channel.channel_ready(), timeout=5)
        yield Running(app, scoring_pb2_grpc.ScoringServiceStub(channel), channel, exporter)


@pytest_asyncio.fixture(scope="module")
async def cascade(
    model_dir: Path,
    redis_server: RedisServer,
    nats_server: NatsServer,
    heavy_triton: TritonServer,
) -> AsyncIterator[Running]:
    settings = settings_for(model_dir, redis_server.url, nats_server.url, heavy_triton.grpc_url)
    async with running(settings, workers=2) as r:
        yield r


async def test_scores_end_to_end_through_every_stage(cascade: Running) -> None:
    request = new_request()
    reply = await cascade.stub.Score(request, timeout=1.0)
    assert reply.transaction_id == request.transaction.transaction_id
    assert reply.decided_by == R.DECIDED_BY_STAGE2
    assert reply.escalated and not reply.degraded and list(reply.reasons) == []
    assert 0.0 <= reply.score <= 1.0 and 0.0 <= reply.stage1_score <= 1.0
    assert reply.decision in (R.DECISION_APPROVE, R.DECISION_REVIEW, R.DECISION_DECLINE)
    registry = load_registry(cascade.app._settings.model_dir)
    assert reply.versions.stage1 == registry.stage1.version
    assert reply.versions.stage2 == registry.stage2.version
    assert reply.versions.feature_set == registry.feature_set
    assert reply.versions.policy == "policy-escalate-all"
    t = reply.timings
    assert t.redis_us > 0 and t.stage1_us > 0 and t.stage2_us > 0
    assert t.total_us >= t.stage1_us + t.stage2_us
    assert len(reply.trace_id) == 32 and int(reply.trace_id, 16) != 0


async def test_same_transaction_again_is_a_cache_hit(cascade: Running) -> None:
    request = new_request()
    first = await cascade.stub.Score(request, timeout=1.0)
    assert cascade.app.writer is not None
    await cascade.app.writer.flush()
    second = await cascade.stub.Score(request, timeout=1.0)
    assert first.decided_by == R.DECIDED_BY_STAGE2
    assert second.decided_by == R.DECIDED_BY_CACHE
    assert second.score == pytest.approx(first.score)
    assert second.decision == first.decision
    assert second.timings.stage1_us == 0 and second.timings.stage2_us == 0


async def test_history_feeds_the_next_transaction(
    cascade: Running, redis_server: RedisServer
) -> None:
    import redis.asyncio as aioredis

    card = f"card-{uuid.uuid4().hex[:8]}"
    for i in range(3):
        await cascade.stub.Score(
            new_request(card_id=card, timestamp_ms=1_763_800_000_000 + i * 60_000), timeout=1.0
        )
    assert cascade.app.writer is not None
    await cascade.app.writer.flush()
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await client.llen(card_history_key(TEST_PSEUDONYMS.card(card), "fs-1")) == 3
    finally:
        await client.aclose()


async def test_retried_degraded_answers_are_answered_alike_and_leave_the_history_alone(
    model_dir: Path, redis_server: RedisServer, nats_server: NatsServer
) -> None:
    """Stage 2 down: answers are degraded and never cached, so a retry is scored again after its
    first attempt's history entry was written. The retry reads the history the first attempt
    read (its stage-1 score is the real model's on those features, not on a history holding the
    transaction itself), answers alike, and adds no entry; a retried batch likewise."""
    import redis.asyncio as aioredis

    no_triton = f"127.0.0.1:{free_port()}"
    settings = settings_for(model_dir, redis_server.url, nats_server.url, no_triton)
    registry = load_registry(model_dir)
    model = ScreeningModel(registry.stage1_path, version=registry.stage1.version)
    card = f"card-{uuid.uuid4().hex[:8]}"
    start_ms = 1_763_800_000_000
    earlier = [
        new_request(card_id=card, timestamp_ms=start_ms + i * 60_000, device_id=f"dev-{i}")
        for i in range(3)
    ]
    retried = new_request(
        card_id=card,
        timestamp_ms=start_ms + 5 * 60_000,
        device_id="dev-new",
        amount_minor=250_000,
        ip_country="RU",
    )
    client = aioredis.Redis.from_url(redis_server.url)
    key = card_history_key(TEST_PSEUDONYMS.card(card), registry.feature_set)
    try:
        async with running(settings, wait_serving=False) as r:
            assert r.app.writer is not None
            for request in earlier:
                await r.stub.Score(request, timeout=2.0)
            await r.app.writer.flush()
            first = await r.stub.Score(retried, timeout=2.0)
            await r.app.writer.flush()
            stored = await client.lrange(key, 0, -1)
            second = await r.stub.Score(retried, timeout=2.0)
            await r.app.writer.flush()
            assert await client.lrange(key, 0, -1) == stored

            batch = R.ScoreBatchRequest(
                transactions=[
                    new_request(card_id=card, timestamp_ms=start_ms + i * 1_000).transaction
                    for i in range(6)
                ]
            )
            first_batch = await r.stub.ScoreBatch(batch, timeout=5.0)
            await r.app.writer.flush()
            stored_after_batch = await client.lrange(key, 0, -1)
            second_batch = await r.stub.ScoreBatch(batch, timeout=5.0)
            await r.app.writer.flush()
            assert await client.lrange(key, 0, -1) == stored_after_batch
    finally:
        await client.aclose()

    assert list(first.reasons) == [R.REASON_STAGE2_UNAVAILABLE] and first.degraded
    assert second.decided_by == first.decided_by == R.DECIDED_BY_STAGE1
    assert (second.decision, second.score, list(second.reasons)) == (
        first.decision,
        first.score,
        list(first.reasons),
    )
    history = [decode_history_entry(b) for b in stored if isinstance(b, bytes)]
    assert len(stored) == 4 and history[0].transaction_id == retried.transaction.transaction_id
    # The features read the tokens the orchestrator stored (equal devices, equal tokens).
    tx = TEST_PSEUDONYMS.transaction(validate_transaction(retried.transaction))
    rows = np.stack([screening_features(tx, history[1:]), screening_features(tx, history)])
    without_itself, with_itself = model.predict(rows).tolist()
    assert second.stage1_score == pytest.approx(without_itself, rel=1e-5)
    assert with_itself != pytest.approx(without_itself, rel=0.01)  # this would see the old bug
    assert len(stored_after_batch) == 10
    assert [(x.decision, x.score, list(x.reasons)) for x in second_batch.results] == [
        (x.decision, x.score, list(x.reasons)) for x in first_batch.results
    ]
    assert all(x.degraded for x in first_batch.results)


async def test_bumped_model_version_misses_the_cache(
    cascade: Running,
    model_dir: Path,
    tmp_path: Path,
    redis_server: RedisServer,
    nats_server: NatsServer,
    heavy_triton: TritonServer,
) -> None:
    request = new_request()
    await cascade.stub.Score(request, timeout=1.0)
    assert cascade.app.writer is not None
    await cascade.app.writer.flush()
    assert (await cascade.stub.Score(request, timeout=1.0)).decided_by == R.DECIDED_BY_CACHE

    bumped = tmp_path / "models"
    shutil.copytree(model_dir, bumped)
    registry = json.loads((bumped / "registry.json").read_text())
    registry["stage1"]["version"] += "-bumped"
    (bumped / "registry.json").write_text(json.dumps(registry))
    settings = settings_for(bumped, redis_server.url, nats_server.url, heavy_triton.grpc_url)
    async with running(settings) as r:
        reply = await r.stub.Score(request, timeout=1.0)
    assert reply.decided_by == R.DECIDED_BY_STAGE2
    assert reply.versions.stage1.endswith("-bumped")


async def test_one_trace_spans_caller_orchestrator_worker_and_triton(cascade: Running) -> None:
    caller_trace = uuid.uuid4().hex
    traceparent = f"00-{caller_trace}-{uuid.uuid4().hex[:16]}-01"
    reply = await cascade.stub.Score(
        new_request(), timeout=1.0, metadata=(("traceparent", traceparent),)
    )
    assert reply.trace_id == caller_trace
    spans = [
        s
        for s in cascade.spans.get_finished_spans()
        if s.context is not None and format(s.context.trace_id, "032x") == caller_trace
    ]
    by_name = {s.name: s for s in spans}
    assert {
        "cascade.Score",
        "redis.lookup",
        "stage1.screen",
        "screening.score",
        "stage2.infer",
    } <= set(by_name)
    root, client, worker = (
        by_name["cascade.Score"],
        by_name["stage1.screen"],
        by_name["screening.score"],
    )
    assert root.parent is not None and format(root.parent.span_id, "016x") == traceparent[36:52]
    assert worker.parent is not None and client.context is not None
    assert worker.parent.span_id == client.context.span_id  # continued from the NATS headers
    assert by_name["stage2.infer"].parent is not None
    assert by_name["stage2.infer"].parent.span_id == root.context.span_id


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"transaction_id": ""}, "transaction.transaction_id"),
        ({"card_id": ""}, "transaction.card_id"),
        ({"amount_minor": -100}, "transaction.amount_minor"),
        ({"currency": "ABC"}, "transaction.currency"),
        ({"merchant_id": "m" * 1000}, "transaction.merchant_id"),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    cascade: Running, overrides: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await cascade.stub.Score(new_request(**overrides), timeout=1.0)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (info.value.details() or "")
    assert (await cascade.stub.Score(new_request(), timeout=1.0)).decided_by == R.DECIDED_BY_STAGE2


async def test_missing_transaction_and_huge_message_are_refused(cascade: Running) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await cascade.stub.Score(scoring_pb2.ScoreRequest(), timeout=1.0)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "transaction" in (info.value.details() or "")
    huge = new_request(device_id="x" * (5 * 1024 * 1024))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await cascade.stub.Score(huge, timeout=2.0)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await cascade.stub.Score(new_request(), timeout=1.0)).decided_by == R.DECIDED_BY_STAGE2


async def test_health_is_serving_and_reflection_lists_the_service(cascade: Running) -> None:
    health = health_pb2_grpc.HealthStub(cascade.channel)
    status = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(cascade.channel)
    call = reflect.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    async for response in call:
        names = {s.name for s in response.list_services_response.service}
        assert "cascade.v1.ScoringService" in names
        break


async def test_reflection_v1_is_served_beside_v1alpha(cascade: Running) -> None:
    # Current grpcurl asks for v1 first; its messages are v1alpha's under another package name.
    v1 = cascade.channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="cascade.v1.ScoringService"),
    ]
    replies = [reply async for reply in v1(iter(requests), timeout=2.0)]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"cascade.v1.ScoringService", "grpc.reflection.v1.ServerReflection"} <= names
    assert replies[1].file_descriptor_response.file_descriptor_proto  # the .proto, serialized


async def test_answers_are_counted_in_prometheus_metrics(cascade: Running) -> None:
    def stage2_answers() -> float:
        return sum(
            REGISTRY.get_sample_value(
                "cascade_scores_total", {"decided_by": "STAGE2", "decision": d}
            )
            or 0.0
            for d in ("APPROVE", "REVIEW", "DECLINE")
        )

    before = stage2_answers()
    before_total = REGISTRY.get_sample_value("cascade_stage_seconds_count", {"stage": "total"}) or 0
    for _ in range(3):
        await cascade.stub.Score(new_request(), timeout=1.0)
    assert stage2_answers() == before + 3
    after_total = REGISTRY.get_sample_value("cascade_stage_seconds_count", {"stage": "total"})
    assert after_total == before_total + 3


async def test_score_batch_answers_in_order_with_one_pass(cascade: Running) -> None:
    card = f"card-{uuid.uuid4().hex[:8]}"
    transactions = [
        new_request(card_id=card, timestamp_ms=1_763_800_000_000 + i * 30_000).transaction
        for i in range(20)
    ]
    reply = await cascade.stub.ScoreBatch(
        scoring_pb2.ScoreBatchRequest(transactions=transactions), timeout=5.0
    )
    assert [r.transaction_id for r in reply.results] == [t.transaction_id for t in transactions]
    assert all(r.decided_by == R.DECIDED_BY_STAGE2 for r in reply.results)
    assert all(not r.degraded for r in reply.results)
    assert len({r.trace_id for r in reply.results}) == 1

    bad = scoring_pb2.ScoreBatchRequest(
        transactions=[*transactions[:2], new_request(amount_minor=0).transaction]
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await cascade.stub.ScoreBatch(bad, timeout=5.0)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "transactions[2].amount_minor" in (info.value.details() or "")


async def test_served_versions_are_published_as_metrics(
    model_dir: Path, redis_server: RedisServer, nats_server: NatsServer, heavy_triton: TritonServer
) -> None:
    # The info metric is per process; start a fresh orchestrator so no other test's is current.
    settings = settings_for(model_dir, redis_server.url, nats_server.url, heavy_triton.grpc_url)
    async with running(settings) as r:
        info = {
            "role": "orchestrator",
            "policy": "policy-escalate-all",
            "stage1": r.app.versions.stage1,
            "stage2": r.app.versions.stage2,
            "feature_set": r.app.versions.feature_set,
        }
        assert REGISTRY.get_sample_value("cascade_models_info", info) == 1.0
