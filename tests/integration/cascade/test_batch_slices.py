"""A large ScoreBatch lets the event loop run while it validates and answers: counted in
transactions between two turns of a task on the orchestrator's own loop (in-process, real Redis
and NATS), not in time, so a slow host cannot make it pass or fail."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider

from cascade.v1 import scoring_pb2, scoring_pb2_grpc
from devstack.servers import NatsServer, RedisServer, free_port
from orchestrator import codec, server, validation
from orchestrator.server import BATCH_SLICE_ITEMS, Orchestrator
from tests.conftest import make_wire_transaction
from tests.integration.cascade.conftest import settings_for

pytestmark = pytest.mark.integration

N: int = 1000


def counted(calls: list[int], fn: Callable[..., Any]) -> Callable[..., Any]:
    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return fn(*args, **kwargs)

    return counting


async def test_a_1000_item_batch_is_validated_and_answered_a_slice_at_a_time(
    model_dir: Path,
    redis_server: RedisServer,
    nats_server: NatsServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Validation and pseudonymization of 1,000 transactions, and building their answers, are
    # 15-30 ms of CPU each on this machine; at once they held every concurrent Score call back
    # that long (test_load_protection.py saw live calls shed OVERLOADED beside a batch).
    validated, answered = [0], [0]
    monkeypatch.setattr(
        validation, "validate_transaction", counted(validated, validation.validate_transaction)
    )
    monkeypatch.setattr(server, "result_to_proto", counted(answered, codec.result_to_proto))
    seen: list[tuple[int, int]] = []

    async def ticker() -> None:
        while True:
            seen.append((validated[0], answered[0]))
            await asyncio.sleep(0)

    # No screening worker and no Triton: every answer is a labelled default, which is all this
    # test needs (the slices, not the scores).
    settings = settings_for(
        model_dir, redis_server.url, nats_server.url, f"127.0.0.1:{free_port()}"
    )
    settings.server.port = 0
    run = uuid.uuid4().hex[:8]
    txs = [
        make_wire_transaction(transaction_id=f"{run}-{i}", card_id=f"{run}-card-{i % 50}")
        for i in range(N)
    ]
    provider = TracerProvider()
    try:
        async with (
            Orchestrator(settings, tracer_provider=provider) as app,
            grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
        ):
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            tick = asyncio.create_task(ticker())
            validated[0] = answered[0] = 0
            seen.clear()
            reply = await stub.ScoreBatch(
                scoring_pb2.ScoreBatchRequest(transactions=txs), timeout=10.0
            )
            tick.cancel()
    finally:
        provider.shutdown()
    assert [r.transaction_id for r in reply.results] == [tx.transaction_id for tx in txs]
    final = (validated[0], answered[0])
    assert final == (N, N)
    steps = [(b[0] - a[0], b[1] - a[1]) for a, b in itertools.pairwise([(0, 0), *seen, final])]
    assert max(v for v, _ in steps) <= BATCH_SLICE_ITEMS
    assert max(a for _, a in steps) <= BATCH_SLICE_ITEMS
