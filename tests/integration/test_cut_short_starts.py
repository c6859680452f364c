"""A NATS client whose start is cut short leaves no connection open, on a real nats-server.

A shutdown or a registry change can cancel a stage-1 client, a screening worker, the decision
log's sink or the outcome store while it connects, subscribes, proves it answers or ensures its
stream. Each start is cancelled a few loop passes later than
the one before, until one completes; after every cancelled one the server (its ``/connz``)
must count no connection of ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from opentelemetry.trace import NoOpTracer

from cascade.outcome_store import OutcomeStore
from cascade.settings import DecisionLogSettings, HedgingSettings, OutcomeSettings
from devstack.servers import NatsServer
from orchestrator.decision_log import JetStreamSink
from orchestrator.screening_client import NatsScreener
from stages.screening.model import ScreeningModel
from stages.screening.worker import ScreeningWorker
from tests.integration.stages.test_screening_worker import PREFIX, build_screening_onnx

pytestmark = pytest.mark.integration

_MAX_PASSES = 100_000  # every start here completes in far fewer


@pytest_asyncio.fixture
async def monitored_nats(server_log_dir: Path) -> AsyncIterator[NatsServer]:
    async with NatsServer(
        log_dir=server_log_dir / "nats-cut-short", monitor_port=0, jetstream=True
    ) as server:
        yield server


def _connections(server: NatsServer) -> int:
    with urllib.request.urlopen(f"{server.monitor_url}/connz", timeout=2.0) as reply:
        return int(json.load(reply)["num_connections"])


async def _no_connections(server: NatsServer, timeout_s: float = 3.0) -> bool:
    """True once the server counts no client connection (it notices a closed socket at once)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            for _ in itertools.count():  # the server has nothing to wait on
                if not await asyncio.to_thread(_connections, server):
                    return True
                await asyncio.sleep(0.02)
    return False


async def _cut_short(
    server: NatsServer, make: Callable[[], AbstractAsyncContextManager[Any]]
) -> int:
    """Cancel ``make()``'s start after 0, 1, 2, ... loop passes (steps growing by an eighth), until
    one completes before its cancellation; check after each cancelled start that no connection
    stayed open. Returns how many starts were cancelled.

    (A start may also complete although cancelled: nats-py connects under ``asyncio.wait_for``,
    which on Python 3.11 can swallow a cancellation. Such a start is closed and the next tried.)"""
    passes, cancelled = 0, 0
    while passes < _MAX_PASSES:
        client = make()
        start = asyncio.create_task(client.__aenter__())
        for _ in range(passes):
            await asyncio.sleep(0)
        done_before = start.done()
        start.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await start
        if not start.cancelled():
            await client.__aexit__(None, None, None)
            assert await _no_connections(server)
            if done_before:
                return cancelled
        else:
            cancelled += 1
            assert await _no_connections(server), f"a start cancelled after {passes} loop passes"
        passes += 1 + passes // 8
    raise AssertionError(f"no start completed within {_MAX_PASSES} loop passes")


async def test_a_stage1_client_cut_short_closes_its_connection(
    monitored_nats: NatsServer,
) -> None:
    def screener() -> NatsScreener:
        return NatsScreener(
            monitored_nats.url,
            subject_prefix=PREFIX,
            model_version="s1-cut",
            feature_set="fs-1",
            tracer=NoOpTracer(),
            hedging=HedgingSettings(),  # the hedged client subscribes after connecting
        )

    assert await _cut_short(monitored_nats, screener) >= 3


async def test_a_screening_worker_cut_short_closes_its_connection(
    monitored_nats: NatsServer, tmp_path: Path
) -> None:
    onnx_path = build_screening_onnx(tmp_path / "model.onnx")

    def worker() -> ScreeningWorker:
        return ScreeningWorker(
            ScreeningModel(onnx_path, version="s1-cut"),
            nats_url=monitored_nats.url,
            subject_prefix=PREFIX,
            queue_group="workers",
            feature_set="fs-1",
            tracer=NoOpTracer(),
            heartbeat_s=1.0,
        )

    assert await _cut_short(monitored_nats, worker) >= 3


async def test_the_decision_log_and_outcome_store_cut_short_close_their_connections(
    monitored_nats: NatsServer,
) -> None:
    def sink() -> JetStreamSink:
        return JetStreamSink(monitored_nats.url, DecisionLogSettings())

    def outcomes() -> OutcomeStore:
        return OutcomeStore(monitored_nats.url, OutcomeSettings())  # ensures its stream

    assert await _cut_short(monitored_nats, sink) >= 3
    assert await _cut_short(monitored_nats, outcomes) >= 3
