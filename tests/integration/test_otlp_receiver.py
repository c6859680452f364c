"""The local trace receiver on real sockets: our SDK's OTLP/gRPC exporter, and OTLP/HTTP posts in
protobuf and JSON (Triton's exporter sends JSON with hex ids)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from devstack.otlp_receiver import OtlpReceiver, read_trace

pytestmark = pytest.mark.integration


async def test_grpc_export_from_the_sdk_is_stored(tmp_path: Path) -> None:
    async with OtlpReceiver(tmp_path) as receiver:
        provider = TracerProvider(resource=Resource.create({"service.name": "svc"}))
        exporter = OTLPSpanExporter(endpoint=receiver.grpc_endpoint, insecure=True)
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracer = provider.get_tracer("t")

        def make_spans() -> str:
            with (
                tracer.start_as_current_span("parent") as parent,
                tracer.start_as_current_span("child", attributes={"cascade.decision": "REVIEW"}),
            ):
                pass
            return format(parent.get_span_context().trace_id, "032x")

        trace_id = await asyncio.to_thread(make_spans)
        await asyncio.to_thread(provider.shutdown)
        spans = read_trace(tmp_path, trace_id)
    assert sorted(s.name for s in spans) == ["child", "parent"]
    child = next(s for s in spans if s.name == "child")
    parent = next(s for s in spans if s.name == "parent")
    assert child.parent_span_id == parent.span_id and child.service == "svc"
    assert child.attributes == {"cascade.decision": "REVIEW"}


def post(url: str, body: bytes, content_type: str) -> int:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=5) as reply:
        return int(reply.status)


async def test_http_json_with_hex_ids_and_protobuf_are_stored(tmp_path: Path) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    body = {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": "triton"}}]
                },
                "scopeSpans": [
                    {
                        "spans": [
                            {
                                "traceId": trace_id,
                                "spanId": "8a04459da1b35088",
                                "parentSpanId": "00f067aa0ba902b7",
                                "name": "InferRequest",
                                "startTimeUnixNano": "1000",
                                "endTimeUnixNano": "3000",
                            }
                        ]
                    }
                ],
            }
        ]
    }
    async with OtlpReceiver(tmp_path) as receiver:
        status = await asyncio.to_thread(
            post, receiver.http_traces_url, json.dumps(body).encode(), "application/json"
        )
        assert status == 200
        with pytest.raises(urllib.error.HTTPError) as bad:
            await asyncio.to_thread(
                post, receiver.http_traces_url, b"\xff\x00garbage", "application/x-protobuf"
            )
        assert bad.value.code == 400
        bad.value.close()
    (span,) = read_trace(tmp_path, trace_id)
    assert (span.service, span.name, span.span_id, span.parent_span_id) == (
        "triton",
        "InferRequest",
        "8a04459da1b35088",
        "00f067aa0ba902b7",
    )
    assert span.end_ns - span.start_ns == 2000
