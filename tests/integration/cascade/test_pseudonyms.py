"""No raw card or device id at rest or in telemetry: a few hundred transactions through the real
cascade (Redis, NATS JetStream with the decision log, screening workers, Triton, the orchestrator
in process, every span sampled, logs at DEBUG), then every Redis key and value, every decision
record (and the spool), every exported span and every log record is searched for the ids sent.
Positive checks make sure the scan looks where the tokens are. Then a key rotation: histories
written under the old key are read, and moved, under the new one."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import SecretStr

from cascade.features import decode_history_entry, screening_features
from cascade.model_registry import load_registry
from cascade.pseudonym import Pseudonymizer, PseudonymKey
from cascade.settings import DecisionLogSettings, PseudonymSettings, Settings
from cascade.v1 import scoring_pb2, scoring_pb2_grpc
from devstack.decisions import read_decision_rows
from devstack.servers import NatsServer, RedisServer, TritonServer
from orchestrator.online_store import card_history_key
from orchestrator.server import Orchestrator
from orchestrator.validation import validate_transaction
from stages.screening.model import ScreeningModel
from stages.screening.worker import ScreeningWorker
from tests.conftest import BASE_TS_MS, TEST_PSEUDONYMS, make_wire_transaction
from tests.integration.cascade.conftest import settings_for

pytestmark = pytest.mark.integration

R = scoring_pb2
N_CARDS = 40
N_DEVICES = 60
N_SINGLE = 200
N_BATCHED = 120


@asynccontextmanager
async def cascade(
    settings: Settings, exporter: InMemorySpanExporter
) -> AsyncIterator[tuple[Orchestrator, scoring_pb2_grpc.ScoringServiceStub]]:
    """Two screening workers and the orchestrator in this process, every span exported."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = load_registry(settings.model_dir)
    async with AsyncExitStack() as stack:
        stack.callback(provider.shutdown)
        for _ in range(2):
            await stack.enter_async_context(
                ScreeningWorker(
                    ScreeningModel(registry.stage1_path, version=registry.stage1.version),
                    nats_url=settings.nats.url,
                    subject_prefix=settings.nats.subject_prefix,
                    queue_group=settings.nats.queue_group,
                    feature_set=registry.feature_set,
                    tracer=provider.get_tracer("test.worker"),
                )
            )
        app = await stack.enter_async_context(Orchestrator(settings, tracer_provider=provider))
        await app.wait_serving(timeout_s=30)
        channel = await stack.enter_async_context(
            grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        )
        yield app, scoring_pb2_grpc.ScoringServiceStub(channel)


def with_log(settings: Settings, stream: str) -> Settings:
    """``settings`` with a decision log of its own (stream, subjects, spool)."""
    log = DecisionLogSettings(
        stream=stream,
        subject_prefix=stream.lower(),
        spool_dir=Path(tempfile.mkdtemp(prefix="cascade-test-spool-")),
        batch_interval_ms=20,
    )
    return settings.model_copy(update={"decision_log": log})


async def redis_dump(url: str) -> dict[bytes, list[bytes]]:
    """Every key in Redis with its value(s)."""
    client = aioredis.Redis.from_url(url)
    dump: dict[bytes, list[bytes]] = {}
    try:
        async for key in client.scan_iter(count=1000):
            kind = await client.type(key)
            if kind == b"list":
                values = await client.lrange(key, 0, -1)
            elif kind == b"string":
                values = [await client.get(key) or b""]
            else:
                values = [kind]
            dump[key] = [v for v in values if isinstance(v, bytes)]
    finally:
        await client.aclose()
    return dump


async def test_no_raw_card_or_device_id_in_redis_decisions_spans_or_logs(
    model_dir: Path,
    nats_server: NatsServer,
    heavy_triton: TritonServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    run = uuid.uuid4().hex[:8]
    # Every raw id holds this marker, which no token (hex) and no other field contains.
    marker = f"raw{run}"
    cards = [f"card-{marker}-{i:03d}" for i in range(N_CARDS)]
    devices = [f"dev-{marker}-{j:03d}" for j in range(N_DEVICES)]

    def request_tx(n: int) -> scoring_pb2.Transaction:
        return make_wire_transaction(
            transaction_id=f"tx-{run}-{n:05d}",
            card_id=cards[n % N_CARDS],
            device_id=devices[(n * 7) % N_DEVICES],
            timestamp_ms=BASE_TS_MS + n * 60_000,
            amount_minor=1_000 + 37 * n,
        )

    caplog.set_level(logging.DEBUG)
    exporter = InMemorySpanExporter()
    stream = f"DECISIONS_P{run}"
    async with RedisServer(log_dir=tmp_path / "redis") as redis:
        settings = with_log(
            settings_for(model_dir, redis.url, nats_server.url, heavy_triton.grpc_url), stream
        )
        async with cascade(settings, exporter) as (app, stub):
            singles = [R.ScoreRequest(transaction=request_tx(n)) for n in range(N_SINGLE)]
            slots = asyncio.Semaphore(8)

            async def score(request: scoring_pb2.ScoreRequest) -> scoring_pb2.ScoreResponse:
                async with slots:
                    reply: scoring_pb2.ScoreResponse = await stub.Score(request, timeout=5.0)
                    return reply

            replies = await asyncio.gather(*(score(r) for r in singles))
            batch = R.ScoreBatchRequest(
                transactions=[request_tx(n) for n in range(N_SINGLE, N_SINGLE + N_BATCHED)]
            )
            batch_reply = await stub.ScoreBatch(batch, timeout=10.0)
            # A retried transaction: an output-cache hit.
            again = await stub.Score(singles[0], timeout=5.0)
            assert app.writer is not None and app.decisions is not None
            await app.writer.flush()
            await app.decisions.flush()
        dump = await redis_dump(redis.url)

    answered = [*replies, *batch_reply.results]
    assert len(answered) == N_SINGLE + N_BATCHED
    assert sum(r.decided_by == R.DECIDED_BY_STAGE2 for r in answered) > N_SINGLE  # all stages ran
    assert again.decided_by == R.DECIDED_BY_CACHE

    raw = marker.encode()
    # Redis: keys and values.
    assert all(raw not in key for key in dump), [k for k in dump if raw in k][:3]
    leaked = [k for k, values in dump.items() if any(raw in v for v in values)]
    assert leaked == []
    feature_set = load_registry(model_dir).feature_set
    history_keys = {card_history_key(TEST_PSEUDONYMS.card(c), feature_set).encode() for c in cards}
    assert history_keys <= set(dump)  # every card's history, under its token
    stored = b"".join(v for k in history_keys for v in dump[k])
    assert all(TEST_PSEUDONYMS.device(d).encode() in stored for d in devices)

    # The decision log: every record, as `cascade decisions` reads it, and the spool's files.
    rows = [
        row
        async for row in read_decision_rows(
            nats_server.url, stream=stream, subject_prefix=stream.lower()
        )
    ]
    assert len(rows) >= N_SINGLE + N_BATCHED  # the retry is deduplicated (its transaction id)
    assert all(marker not in json.dumps(row) for row in rows)
    ours = [r for r in rows if str(r["transaction_id"]).startswith(f"tx-{run}-")]
    assert {r["card_id"] for r in ours} == {TEST_PSEUDONYMS.card(c) for c in cards}
    assert {r["device_id"] for r in ours} == {TEST_PSEUDONYMS.device(d) for d in devices}
    spooled = [p.read_bytes() for p in settings.decision_log.spool_dir.rglob("*") if p.is_file()]
    assert all(raw not in data for data in spooled)

    # Spans: names, attributes, events, status, resource.
    spans = exporter.get_finished_spans()
    assert len(spans) > N_SINGLE
    span_text = "\n".join(span.to_json() for span in spans)
    assert marker not in span_text
    assert f"tx-{run}-00001" in span_text  # the scan reads the attributes requests set

    # Logs at DEBUG, every logger, arguments included.
    assert caplog.records
    for record in caplog.records:
        assert marker not in record.getMessage(), record.getMessage()
        assert marker not in repr(record.args)


async def test_a_rotation_reads_and_moves_histories_written_under_the_previous_key(
    model_dir: Path,
    redis_server: RedisServer,
    nats_server: NatsServer,
    heavy_triton: TritonServer,
) -> None:
    old_key, new_key = secrets.token_hex(32), secrets.token_hex(32)
    before = Pseudonymizer(PseudonymKey("k1", old_key.encode()))
    after = Pseudonymizer(PseudonymKey("k2", new_key.encode()))
    base = settings_for(model_dir, redis_server.url, nats_server.url, heavy_triton.grpc_url)
    rotating = PseudonymSettings(
        key=SecretStr(new_key),
        key_id="k2",
        previous_key=SecretStr(old_key),
        previous_key_id="k1",
    )
    card = f"card-{uuid.uuid4().hex[:8]}"
    feature_set = load_registry(model_dir).feature_set
    old_history = card_history_key(before.card(card), feature_set)
    new_history = card_history_key(after.card(card), feature_set)

    def request(n: int) -> scoring_pb2.ScoreRequest:
        return R.ScoreRequest(
            transaction=make_wire_transaction(
                transaction_id=f"tx-{uuid.uuid4().hex[:12]}",
                card_id=card,
                timestamp_ms=BASE_TS_MS + n * 60_000,
            )
        )

    client = aioredis.Redis.from_url(redis_server.url)
    try:
        first = base.model_copy(
            update={"pseudonym": PseudonymSettings(key=SecretStr(old_key), key_id="k1")}
        )
        async with cascade(first, InMemorySpanExporter()) as (app, stub):
            for n in range(3):
                await stub.Score(request(n), timeout=5.0)
            assert app.writer is not None
            await app.writer.flush()
        assert await client.llen(old_history) == 3
        assert await client.exists(new_history) == 0

        fourth = request(3)
        async with cascade(
            base.model_copy(update={"pseudonym": rotating}), InMemorySpanExporter()
        ) as (app, stub):
            reply = await stub.Score(fourth, timeout=5.0)
            assert app.writer is not None
            await app.writer.flush()
        # The write moved the three entries under k1 to k2, before adding its own...
        moved = [
            decode_history_entry(b)
            for b in await client.lrange(new_history, 0, -1)
            if isinstance(b, bytes)
        ]
        assert len(moved) == 4 and moved[0].transaction_id == fourth.transaction.transaction_id
        assert await client.llen(old_history) == 3  # left to expire with its TTL
        # ...and the features had read them: the stage-1 score is the one on that history.
        tx = after.transaction(validate_transaction(fourth.transaction))
        registry = load_registry(model_dir)
        model = ScreeningModel(registry.stage1_path, version=registry.stage1.version)
        with_history, without = model.predict(
            np.stack([screening_features(tx, moved[1:]), screening_features(tx, [])])
        ).tolist()
        assert reply.stage1_score == pytest.approx(with_history, rel=1e-5)
        assert with_history != pytest.approx(without, rel=1e-3)

        # Once rotated, the previous key is no longer needed for this card.
        done = base.model_copy(
            update={"pseudonym": PseudonymSettings(key=SecretStr(new_key), key_id="k2")}
        )
        async with cascade(done, InMemorySpanExporter()) as (app, stub):
            await stub.Score(request(4), timeout=5.0)
            assert app.writer is not None
            await app.writer.flush()
        assert await client.llen(new_history) == 5
    finally:
        await client.aclose()
