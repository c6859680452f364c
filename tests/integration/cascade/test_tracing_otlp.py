"""Traces leave the processes over OTLP, configured only by the standard ``OTEL_*`` variables, and
one trace id spans caller -> orchestrator -> screening worker (another process) -> Triton call."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from cascade.v1 import scoring_pb2
from devstack.servers import NatsServer, RedisServer, TritonServer
from tests.integration.cascade.conftest import cascade_processes, new_request

pytestmark = pytest.mark.integration


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps (service name, span) pairs."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Span]] = []
        self.arrived = asyncio.Event()

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext,
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend((service, span) for span in scope_spans.spans)
        self.arrived.set()
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest_asyncio.fixture
async def collector() -> AsyncIterator[tuple[Collector, int]]:
    server = grpc.aio.server()
    servicer = Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, port
    await server.stop(grace=None)


async def test_one_trace_spans_every_process_over_otlp(
    collector: tuple[Collector, int],
    model_dir: Path,
    redis_server: RedisServer,
    nats_server: NatsServer,
    heavy_triton: TritonServer,
    tmp_path: Path,
) -> None:
    sink, port = collector
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
    }
    caller_trace = uuid.uuid4().hex
    async with cascade_processes(
        model_dir,
        tmp_path,
        redis_url=redis_server.url,
        nats_url=nats_server.url,
        triton_url=heavy_triton.grpc_url,
        extra_env=otel,
    ) as (stub, _, _):
        reply = await stub.Score(
            new_request(),
            timeout=1.0,
            metadata=(("traceparent", f"00-{caller_trace}-{uuid.uuid4().hex[:16]}-01"),),
        )
        assert reply.trace_id == caller_trace
        assert reply.decided_by == scoring_pb2.DECIDED_BY_STAGE2

        def ours() -> dict[str, tuple[str, Span]]:
            return {
                span.name: (service, span)
                for service, span in sink.spans
                if span.trace_id.hex() == caller_trace
            }

        async with asyncio.timeout(10):
            while not {"cascade.Score", "stage1.screen", "screening.score", "stage2.infer"} <= set(
                ours()
            ):
                sink.arrived.clear()
                await sink.arrived.wait()
    spans = ours()
    assert spans["cascade.Score"][0] == "cascade-orchestrator"
    assert spans["stage2.infer"][0] == "cascade-orchestrator"
    assert spans["screening.score"][0] == "cascade-screening-worker"
    worker_span, client_span = spans["screening.score"][1], spans["stage1.screen"][1]
    assert worker_span.parent_span_id == client_span.span_id
