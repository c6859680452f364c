"""Spans as stored records, and a trace as a terminal waterfall: pure functions, no I/O.

:mod:`devstack.otlp_receiver` turns every OTLP export it receives into :class:`SpanRecord` lines
(JSON, one span a line); ``cascade trace TRACE_ID`` reads them back and prints :func:`waterfall`::

    trace 5b8aa5a2d2c872e8321cf37308d69df2: 5 spans, 4.31 ms
      start    took  service               span
      0.000   4.310  cascade-orchestrator  cascade.Score  [####################]  decision=APPROVE ...
      0.150   0.300  cascade-orchestrator    redis.lookup [ #                  ]
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Final

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

__all__ = ["SpanRecord", "parse_record", "records_from_otlp", "waterfall"]

_BAR_WIDTH: Final = 24
# Attributes worth a column in the waterfall; the rest stay in the stored record.
SHOWN_ATTRIBUTES: Final = (
    "cascade.decision",
    "cascade.decided_by",
    "cascade.reasons",
    "cascade.versions",
    "cascade.transaction_id",
    "cascade.stage1.hedge_won",
    "cascade.batch_size",
    "cascade.batch_rows",
    "cascade.model_version",
    "messaging.destination.name",
    "triton.model",
    "model_name",
    "model_version",
)


@dataclass(frozen=True, slots=True)
class SpanRecord:
    """One finished span, as stored."""

    trace_id: str
    span_id: str
    parent_span_id: str
    service: str
    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, object] = field(default_factory=dict)
    status: str = ""

    def to_json(self) -> str:
        """One JSON line."""
        return json.dumps(asdict(self), separators=(",", ":"), default=str)


def parse_record(line: str) -> SpanRecord:
    """A record from one stored line; ValueError if it is not one."""
    try:
        data = json.loads(line)
        return SpanRecord(
            trace_id=str(data["trace_id"]),
            span_id=str(data["span_id"]),
            parent_span_id=str(data["parent_span_id"]),
            service=str(data["service"]),
            name=str(data["name"]),
            start_ns=int(data["start_ns"]),
            end_ns=int(data["end_ns"]),
            attributes=dict(data.get("attributes") or {}),
            status=str(data.get("status", "")),
        )
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a span record: {exc}") from exc


def _value(v: AnyValue) -> object:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind) if kind else None


def _attributes(kvs: Iterable[KeyValue]) -> dict[str, object]:
    return {kv.key: _value(kv.value) for kv in kvs}


def records_from_otlp(request: ExportTraceServiceRequest) -> list[SpanRecord]:
    """Every span of one OTLP export (gRPC or HTTP, protobuf or JSON decoded into the message)."""
    records = []
    for resource_spans in request.resource_spans:
        service = str(_attributes(resource_spans.resource.attributes).get("service.name", "?"))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                records.append(
                    SpanRecord(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        service=service,
                        name=span.name,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        attributes=_attributes(span.attributes),
                        status=span.status.message,
                    )
                )
    return records


def _ordered(spans: Sequence[SpanRecord]) -> list[tuple[int, SpanRecord]]:
    """Depth-first, children by start time; spans whose parent is not here are roots."""
    ids = {s.span_id for s in spans}
    children: dict[str, list[SpanRecord]] = {}
    roots = []
    for s in sorted(spans, key=lambda s: s.start_ns):
        if s.parent_span_id and s.parent_span_id in ids:
            children.setdefault(s.parent_span_id, []).append(s)
        else:
            roots.append(s)
    out: list[tuple[int, SpanRecord]] = []

    def walk(span: SpanRecord, depth: int) -> None:
        out.append((depth, span))
        for child in children.get(span.span_id, []):
            walk(child, depth + 1)

    for root in roots:
        walk(root, 0)
    return out


def _shown(attributes: dict[str, object]) -> str:
    parts = []
    for key in SHOWN_ATTRIBUTES:
        if key in attributes:
            value = attributes[key]
            if isinstance(value, list):
                value = ",".join(str(v) for v in value)
            parts.append(f"{key.removeprefix('cascade.')}={value}")
    return "  ".join(parts)


def waterfall(spans: Sequence[SpanRecord]) -> list[str]:
    """The trace as lines: start offset and duration in ms, service, indented span name, a bar
    showing where in the trace it ran, and the attributes that matter."""
    if not spans:
        return []
    t0 = min(s.start_ns for s in spans)
    t1 = max(s.end_ns for s in spans)
    total = max(t1 - t0, 1)
    ordered = _ordered(spans)
    service_w = max(len("service"), *(len(s.service) for s in spans))
    name_w = max(len("span"), *(2 * d + len(s.name) for d, s in ordered))
    lines = [
        f"trace {spans[0].trace_id}: {len(spans)} spans, {total / 1e6:.2f} ms",
        f"  {'start':>7} {'took':>7}  {'service':<{service_w}}  {'span':<{name_w}}  "
        f"{'':<{_BAR_WIDTH + 2}}  attributes",
    ]
    for depth, s in ordered:
        begin = (s.start_ns - t0) * _BAR_WIDTH // total
        end = max(begin + 1, -(-(s.end_ns - t0) * _BAR_WIDTH // total))
        bar = " " * begin + "#" * (end - begin) + " " * (_BAR_WIDTH - end)
        name = "  " * depth + s.name
        lines.append(
            f"  {(s.start_ns - t0) / 1e6:7.3f} {(s.end_ns - s.start_ns) / 1e6:7.3f}  "
            f"{s.service:<{service_w}}  {name:<{name_w}}  [{bar}]  {_shown(s.attributes)}".rstrip()
        )
    return lines
