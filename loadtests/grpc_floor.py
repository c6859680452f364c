"""The gRPC floor: a server with the orchestrator's front and none of its work.

``python -m loadtests.grpc_floor`` serves ``ScoringService`` the way the orchestrator does
(grpc.aio on uvloop, the iomgr TCP stack, raw-bytes handlers that decode the request themselves)
and answers every ``Score`` with a fixed APPROVE by stage 1, echoing the transaction id; no
validation, Redis, NATS, Triton, decision log, metrics or spans. ``ScoreBatch`` answers every item
the same way, so ``cascade loadtest``'s history backfill works against it.

``cascade loadtest --floor`` starts it beside the stack and loads it step for step with the
cascade: its CPU per answer is what gRPC and the event loop cost per call on the same machine,
at the same rate and in the same run, before any of the product's work. The cascade's CPU per
answer minus the floor's is what the product itself spends.
"""

from __future__ import annotations

import os

from cascade.grpc_stack import GRPC_EXPERIMENTS_DEFAULT

# Before anything imports grpc: serve on gRPC's iomgr TCP stack (see cascade.grpc_stack).
os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS_DEFAULT)

import asyncio
import sys
from typing import Final

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cascade.runtime import run_service
from cascade.settings import Settings
from cascade.v1 import scoring_pb2

SERVICE_NAME: Final = "cascade.v1.ScoringService"


def _answer(transaction_id: str) -> scoring_pb2.ScoreResponse:
    return scoring_pb2.ScoreResponse(
        transaction_id=transaction_id,
        decision=scoring_pb2.DECISION_APPROVE,
        decided_by=scoring_pb2.DECIDED_BY_STAGE1,
    )


async def score(body: bytes, context: grpc.aio.ServicerContext) -> bytes:
    """The fixed answer for one transaction."""
    request = scoring_pb2.ScoreRequest.FromString(body)
    return _answer(request.transaction.transaction_id).SerializeToString()


async def score_batch(body: bytes, context: grpc.aio.ServicerContext) -> bytes:
    """The fixed answer for every transaction of the batch, in order."""
    request = scoring_pb2.ScoreBatchRequest.FromString(body)
    results = [_answer(tx.transaction_id) for tx in request.transactions]
    return scoring_pb2.ScoreBatchResponse(results=results).SerializeToString()


async def serve(stop: asyncio.Event) -> None:
    """Serve on the orchestrator's host and port settings until ``stop`` is set."""
    settings = Settings().server
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", settings.max_message_bytes)]
    )
    handlers = {
        "Score": grpc.unary_unary_rpc_method_handler(score),
        "ScoreBatch": grpc.unary_unary_rpc_method_handler(score_batch),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    await server.start()
    try:
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        print(f"LISTENING {settings.host}:{port}", flush=True)
        await stop.wait()
    finally:
        await server.stop(grace=1.0)


def main() -> int:
    """Entry point."""
    run_service(serve)
    return 0


if __name__ == "__main__":
    sys.exit(main())
