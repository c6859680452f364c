"""The scoring service decodes request bodies itself: an undecodable one is INVALID_ARGUMENT
naming ``request`` and one throttled WARNING, never grpc's UNKNOWN with a traceback."""

from __future__ import annotations

import logging

import grpc
import pytest

from cascade.throttled_log import ThrottledLog
from cascade.v1 import scoring_pb2
from orchestrator.server import _decoding
from tests.conftest import make_wire_transaction


class Aborted(Exception):
    """What ``FakeContext.abort`` raises, as grpc's raises its own."""


class FakeContext:
    """The two things the decoding wrapper asks of a ``grpc.aio.ServicerContext``."""

    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise Aborted


async def _echo(request: scoring_pb2.ScoreRequest, context: object) -> str:
    return request.transaction.transaction_id


async def test_a_decodable_body_reaches_the_handler_as_its_message() -> None:
    handler = _decoding(scoring_pb2.ScoreRequest, _echo, ThrottledLog(logging.getLogger("t")))
    body = scoring_pb2.ScoreRequest(transaction=make_wire_transaction()).SerializeToString()
    assert await handler(body, FakeContext()) == "tx-0001"


async def test_undecodable_bodies_are_invalid_argument_and_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler = _decoding(scoring_pb2.ScoreRequest, _echo, ThrottledLog(logging.getLogger("t")))
    body = scoring_pb2.ScoreRequest(transaction=make_wire_transaction()).SerializeToString()
    with caplog.at_level(logging.DEBUG):
        for cut in range(1, 50):
            context = FakeContext()
            with pytest.raises(Aborted):
                await handler(body[:-cut], context)  # cut inside the transaction
            assert context.aborted is not None
            code, details = context.aborted
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert details.startswith("request: is not a decodable cascade.v1.ScoreRequest")
    assert [(r.levelname, r.exc_info) for r in caplog.records] == [("WARNING", None)]
    assert "40000" in caplog.records[0].getMessage()
