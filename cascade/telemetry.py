"""OpenTelemetry set-up and W3C trace-context propagation over gRPC metadata and NATS headers.

Exporting is configured by the standard ``OTEL_*`` variables (``OTEL_SERVICE_NAME``,
``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_TRACES_SAMPLER``/``_ARG``, ``OTEL_TRACES_EXPORTER``,
``OTEL_SDK_DISABLED``). Components take a ``TracerProvider`` explicitly rather than reaching for the
global one, so a test can give the orchestrator and a worker one in-memory exporter and see the
whole trace. Telemetry never breaks a request: the batch processor drops and logs on export
failure.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

logger = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()


def build_tracer_provider(
    service_name: str, *, processors: tuple[SpanProcessor, ...] = ()
) -> TracerProvider:
    """A provider for ``service_name`` exporting as the ``OTEL_*`` environment says.

    OTLP over gRPC is used when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the traces-specific variable)
    is set and ``OTEL_TRACES_EXPORTER`` is not ``none``; ``processors`` are added as given (tests
    pass an in-memory exporter's processor).
    """
    name = os.environ.get("OTEL_SERVICE_NAME", service_name)
    exporter_choice = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower()
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    disabled = os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true"
    exporting = not disabled and exporter_choice == "otlp" and bool(endpoint)
    # Recording spans nobody receives cost the screening worker 18% of its CPU (measured with
    # loadtests.ablation): with nowhere to send them and no sampler chosen, record none. Trace
    # context still propagates and responses still carry the trace id.
    sampler = None
    if not exporting and not processors and "OTEL_TRACES_SAMPLER" not in os.environ:
        sampler = ALWAYS_OFF
    provider = TracerProvider(resource=Resource.create({"service.name": name}), sampler=sampler)
    for processor in processors:
        provider.add_span_processor(processor)
    if exporting:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        logger.info("exporting traces over OTLP for service %s", name)
    return provider


@contextmanager
def tracer_provider(
    service_name: str, *, processors: tuple[SpanProcessor, ...] = ()
) -> Iterator[TracerProvider]:
    """:func:`build_tracer_provider` that flushes and shuts down on exit."""
    provider = build_tracer_provider(service_name, processors=processors)
    try:
        yield provider
    finally:
        provider.shutdown()


def records_spans(tracer: trace.Tracer) -> bool:
    """Whether ``tracer`` can record anything; False for a no-op tracer or one that samples
    nothing, so hot paths skip building spans (and their context) that would be dropped."""
    sampler = getattr(tracer, "sampler", None)
    return sampler is not None and sampler is not ALWAYS_OFF


def inject_headers(carrier: MutableMapping[str, str], context: Context | None = None) -> None:
    """Write the current (or given) trace context into ``carrier`` as W3C headers."""
    _PROPAGATOR.inject(carrier, context=context)


class _MetadataGetter(Getter[Mapping[str, str]]):
    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


_GETTER = _MetadataGetter()


def extract_context(carrier: Mapping[str, str] | None) -> Context:
    """The trace context carried in ``carrier`` (gRPC metadata or NATS headers), if any."""
    return _PROPAGATOR.extract(carrier or {}, getter=_GETTER)


_TRACEPARENT: Final = "traceparent"


def untraced_span(metadata: Iterable[tuple[str, str | bytes]]) -> trace.Span:
    """A non-recording span for a call when nothing records spans: it continues the caller's
    W3C trace (or starts a new trace id) with a fresh span id, so the context still propagates
    to the stages and the response still names the trace, without building an SDK span.
    """
    parent: trace.SpanContext | None = None
    for key, value in metadata:
        if key == _TRACEPARENT and isinstance(value, str):
            parent = trace.get_current_span(extract_context({key: value})).get_span_context()
            break
    trace_id = parent.trace_id if parent is not None and parent.is_valid else _random_id(128)
    flags = trace.TraceFlags(parent.trace_flags if parent is not None else trace.TraceFlags.DEFAULT)
    return trace.NonRecordingSpan(
        trace.SpanContext(trace_id, _random_id(64), is_remote=False, trace_flags=flags)
    )


def _random_id(bits: int) -> int:
    # Never 0: an all-zero id is invalid in W3C trace context.
    return random.getrandbits(bits) or 1


def trace_id_hex(span: trace.Span) -> str:
    """The span's trace id as 32 lowercase hex chars ('' when there is no valid context)."""
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""
