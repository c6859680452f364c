"""The screening worker on a real NATS server: answers, concurrent requests, errors, drain."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import numpy as np
import numpy.typing as npt
import onnx
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from onnx import TensorProto, helper, numpy_helper
from opentelemetry.trace import NoOpTracer

from cascade.screening_protocol import (
    encode_screening_request,
    parse_screening_reply,
    screening_subject,
)
from devstack.servers import NatsServer
from stages.screening.model import ScreeningModel
from stages.screening.worker import ScreeningWorker

pytestmark = pytest.mark.integration

N_FEATURES = 6
PREFIX = "test.screen"


def build_screening_onnx(path: Path) -> Path:
    """score = sigmoid(features @ w), w = 0.1 .. 0.6: deterministic, row-wise."""
    weights = np.linspace(0.1, 0.6, N_FEATURES, dtype=np.float32).reshape(N_FEATURES, 1)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "w"], ["logit"]),
            helper.make_node("Sigmoid", ["logit"], ["score"]),
        ],
        "screening",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", N_FEATURES])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def expected(rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    w = np.linspace(0.1, 0.6, N_FEATURES, dtype=np.float32)
    return np.asarray(1.0 / (1.0 + np.exp(-(rows @ w))), dtype=np.float32)


@pytest.fixture(scope="module")
def screening_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_screening_onnx(tmp_path_factory.mktemp("screening") / "model.onnx")


@pytest_asyncio.fixture
async def client(nats_server: NatsServer) -> AsyncIterator[NatsClient]:
    nc = await nats.connect(nats_server.url)
    yield nc
    await nc.close()


def worker_for(
    screening_onnx: Path, nats_server: NatsServer, version: str = "s1-t"
) -> ScreeningWorker:
    return ScreeningWorker(
        ScreeningModel(screening_onnx, version=version),
        nats_url=nats_server.url,
        subject_prefix=PREFIX,
        queue_group="workers",
        feature_set="fs-1",
        tracer=NoOpTracer(),
    )


async def ask(
    nc: NatsClient, rows: npt.NDArray[np.float32], version: str = "s1-t"
) -> npt.NDArray[np.float32]:
    msg = await nc.request(
        screening_subject(PREFIX, version),
        encode_screening_request(rows.astype(np.float32), version, "fs-1"),
        timeout=2.0,
    )
    reply = parse_screening_reply(msg.data)
    assert reply.error == ""
    return reply.scores


async def test_scores_match_the_model(
    screening_onnx: Path, nats_server: NatsServer, client: NatsClient
) -> None:
    rows = np.random.default_rng(1).normal(size=(5, N_FEATURES)).astype(np.float32)
    async with worker_for(screening_onnx, nats_server):
        scores = await ask(client, rows)
    np.testing.assert_allclose(scores, expected(rows), rtol=1e-5)


async def test_concurrent_requests_each_get_their_own_rows(
    screening_onnx: Path, nats_server: NatsServer, client: NatsClient
) -> None:
    rng = np.random.default_rng(2)
    requests = [rng.normal(size=(1 + i % 3, N_FEATURES)).astype(np.float32) for i in range(200)]
    async with worker_for(screening_onnx, nats_server) as worker:
        replies = await asyncio.gather(*(ask(client, rows) for rows in requests))
    for rows, scores in zip(requests, replies, strict=True):
        np.testing.assert_allclose(scores, expected(rows), rtol=1e-5)
    assert worker.stats.requests == 200
    assert worker.stats.rows == sum(r.shape[0] for r in requests)


async def test_wrong_version_and_garbage_get_error_replies(
    screening_onnx: Path, nats_server: NatsServer, client: NatsClient
) -> None:
    subject = screening_subject(PREFIX, "s1-t")
    async with worker_for(screening_onnx, nats_server) as worker:
        wrong_version = encode_screening_request(
            np.zeros((1, N_FEATURES), np.float32), "s1-x", "fs-1"
        )
        reply = parse_screening_reply(
            (await client.request(subject, wrong_version, timeout=2)).data
        )
        assert "s1-x" in reply.error
        wrong_width = encode_screening_request(np.zeros((1, 3), np.float32), "s1-t", "fs-1")
        reply = parse_screening_reply((await client.request(subject, wrong_width, timeout=2)).data)
        assert "3 features per row" in reply.error
        reply = parse_screening_reply(
            (await client.request(subject, b"\xff\x00junk", timeout=2)).data
        )
        assert reply.error.startswith("bad request")
        rows = np.ones((1, N_FEATURES), np.float32)
        np.testing.assert_allclose(await ask(client, rows), expected(rows), rtol=1e-5)
    assert worker.stats.errors == 3


async def test_requests_queued_at_shutdown_are_answered(
    screening_onnx: Path, nats_server: NatsServer, client: NatsClient
) -> None:
    rows = np.ones((1, N_FEATURES), np.float32)
    worker = worker_for(screening_onnx, nats_server)
    await worker.__aenter__()
    pending = [asyncio.ensure_future(ask(client, rows)) for _ in range(50)]
    await asyncio.sleep(0.01)
    await worker.__aexit__(None, None, None)
    replies = await asyncio.gather(*pending, return_exceptions=True)
    answered = [r for r in replies if isinstance(r, np.ndarray)]
    refused = [r for r in replies if isinstance(r, nats.errors.NoRespondersError)]
    # Nothing is lost: each request was answered, or refused at once (never left to time out).
    assert len(answered) + len(refused) == len(pending)
    assert len(answered) == worker.stats.requests > 0
