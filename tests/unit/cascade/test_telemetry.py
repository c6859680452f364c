"""Tracing set-up: record only when spans go somewhere; trace context always propagates."""

from __future__ import annotations

import pytest
from hypothesis import given
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cascade.telemetry import (
    build_tracer_provider,
    extract_context,
    inject_headers,
    trace_id_hex,
    untraced_span,
)
from tests.fuzz_strategies import FUZZ, traceparents

CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture(autouse=True)
def _no_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_SAMPLER", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)


def test_without_an_exporter_spans_are_not_recorded_but_context_flows() -> None:
    tracer = build_tracer_provider("t").get_tracer("t")
    with tracer.start_as_current_span(
        "s", context=extract_context({"traceparent": CALLER})
    ) as span:
        headers: dict[str, str] = {}
        inject_headers(headers)
    assert not span.is_recording()
    assert trace_id_hex(span) == "0af7651916cd43dd8448eb211c80319c"
    assert headers["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")


def test_given_processors_record_every_span() -> None:
    exporter = InMemorySpanExporter()
    provider = build_tracer_provider("t", processors=(SimpleSpanProcessor(exporter),))
    with provider.get_tracer("t").start_as_current_span("s") as span:
        pass
    assert span.is_recording() is False  # ended
    assert [s.name for s in exporter.get_finished_spans()] == ["s"]


def test_an_explicit_sampler_is_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    with build_tracer_provider("t").get_tracer("t").start_as_current_span("s") as span:
        assert span.is_recording()


@FUZZ
@given(traceparents)
def test_any_traceparent_a_caller_sends_gives_a_valid_trace(traceparent: str) -> None:
    """Fuzzed metadata: whatever the header holds, the call gets a valid trace id, continued
    from the caller's when theirs is valid."""
    span = untraced_span([("traceparent", traceparent), ("traceparent", b"\xff")])
    trace_id = trace_id_hex(span)
    assert len(trace_id) == 32 and trace_id != "0" * 32
    tracer = build_tracer_provider("t").get_tracer("t")
    with tracer.start_as_current_span("s", context=extract_context({"traceparent": traceparent})):
        inject_headers({})
