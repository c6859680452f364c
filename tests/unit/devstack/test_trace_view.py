"""Stored span records and the waterfall, from OTLP messages built here (no sockets)."""

from __future__ import annotations

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from devstack.otlp_receiver import _hex_ids_to_base64
from devstack.trace_view import SpanRecord, parse_record, records_from_otlp, waterfall

TRACE = bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736")


def span(
    span_id: str, parent: str, name: str, start_ms: float, end_ms: float, **attrs: object
) -> Span:
    kvs = []
    for key, value in attrs.items():
        if isinstance(value, list):
            v = AnyValue(array_value=ArrayValue(values=[AnyValue(string_value=x) for x in value]))
        elif isinstance(value, bool):
            v = AnyValue(bool_value=value)
        elif isinstance(value, int):
            v = AnyValue(int_value=value)
        else:
            v = AnyValue(string_value=str(value))
        kvs.append(KeyValue(key=key, value=v))
    return Span(
        trace_id=TRACE,
        span_id=bytes.fromhex(span_id),
        parent_span_id=bytes.fromhex(parent),
        name=name,
        start_time_unix_nano=int(1e15 + start_ms * 1e6),
        end_time_unix_nano=int(1e15 + end_ms * 1e6),
        attributes=kvs,
    )


def export(service: str, *spans: Span) -> ExportTraceServiceRequest:
    resource = ResourceSpans(scope_spans=[ScopeSpans(spans=list(spans))])
    resource.resource.attributes.append(
        KeyValue(key="service.name", value=AnyValue(string_value=service))
    )
    return ExportTraceServiceRequest(resource_spans=[resource])


def test_records_carry_ids_service_times_and_attributes() -> None:
    (record,) = records_from_otlp(
        export(
            "orch",
            span(
                "00000000000000aa",
                "",
                "cascade.Score",
                0,
                4,
                **{"cascade.reasons": ["A", "B"], "n": 3},
            ),
        )
    )
    assert record.trace_id == TRACE.hex() and record.span_id == "00000000000000aa"
    assert record.parent_span_id == "" and record.service == "orch"
    assert record.end_ns - record.start_ns == 4_000_000
    assert record.attributes == {"cascade.reasons": ["A", "B"], "n": 3}
    assert parse_record(record.to_json()) == record


def test_unreadable_line_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="span record"):
        parse_record('{"trace_id": "x"}')
    with pytest.raises(ValueError, match="span record"):
        parse_record("not json")


def test_waterfall_nests_children_under_parents_across_services() -> None:
    records = records_from_otlp(
        export(
            "orchestrator",
            span(
                "00000000000000a1", "", "cascade.Score", 0.0, 4.0, **{"cascade.decision": "DECLINE"}
            ),
            span("00000000000000a3", "00000000000000a1", "stage2.infer", 2.0, 3.8),
            span("00000000000000a2", "00000000000000a1", "redis.lookup", 0.1, 0.3),
        )
    ) + records_from_otlp(
        export("triton", span("00000000000000b1", "00000000000000a3", "InferRequest", 2.2, 3.6))
    )
    lines = waterfall(records)
    assert lines[0] == f"trace {TRACE.hex()}: 4 spans, 4.00 ms"
    body = lines[2:]
    assert [b.split()[3] for b in body] == [
        "cascade.Score",
        "redis.lookup",
        "stage2.infer",
        "InferRequest",
    ]
    assert "decision=DECLINE" in body[0]
    # Indentation follows the tree: InferRequest (triton) sits under stage2.infer.
    assert (
        body[3].index("InferRequest")
        > body[2].index("stage2.infer")
        > body[0].index("cascade.Score")
    )
    assert body[0].split()[:2] == ["0.000", "4.000"] and body[3].split()[:2] == ["2.200", "1.400"]
    assert "[" + "#" * 24 + "]" in body[0]


def test_span_whose_parent_is_missing_is_a_root() -> None:
    records = [
        SpanRecord(TRACE.hex(), "b1", "gone", "triton", "InferRequest", 10, 20),
    ]
    assert "InferRequest" in waterfall(records)[2]
    assert waterfall([]) == []


def test_otlp_json_hex_ids_become_protobuf_base64() -> None:
    body = {
        "resourceSpans": [
            {
                "scopeSpans": [
                    {
                        "spans": [
                            {
                                "traceId": TRACE.hex(),
                                "spanId": "00f067aa0ba902b7",
                                "parentSpanId": "",
                            }
                        ]
                    }
                ]
            }
        ]
    }
    converted = _hex_ids_to_base64(body)
    span_json = converted["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert span_json["traceId"] == "S/kvNXezTaajzpKdDg5HNg=="
    assert span_json["parentSpanId"] == ""
