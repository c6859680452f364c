"""A small OTLP trace receiver for the local stack: spans to a file, no Docker, no collector.

``cascade up --traces`` runs one :class:`OtlpReceiver` on loopback. It accepts OTLP/gRPC (what
our services' exporter speaks, ``OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:PORT``) and
OTLP/HTTP with protobuf or JSON bodies at ``/v1/traces`` (what Triton's OpenTelemetry exporter
speaks), and appends every span to ``spans.jsonl`` in its folder as one
:class:`~devstack.trace_view.SpanRecord` a line. :func:`read_trace` reads one trace back for
``cascade trace``. A receiver failure never reaches a service: exporters drop and log.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from devstack.servers import LOOPBACK, resolve_port
from devstack.trace_view import SpanRecord, parse_record, records_from_otlp

logger = logging.getLogger(__name__)

__all__ = ["SPANS_FILE", "OtlpReceiver", "read_trace"]

SPANS_FILE: Final = "spans.jsonl"
_MAX_BODY_BYTES: Final = 16 * 1024 * 1024
_Request = trace_service_pb2.ExportTraceServiceRequest


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    async def Export(
        self, request: _Request, context: grpc.aio.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self._receiver.store(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """OTLP/gRPC on ``grpc_port`` and OTLP/HTTP on ``http_port`` (0: free ports), storing spans in
    ``store_dir``; an async context manager."""

    def __init__(self, store_dir: Path, *, grpc_port: int = 0, http_port: int = 0) -> None:
        self.store_dir: Final = store_dir
        self.grpc_port: Final = resolve_port(grpc_port)
        self.http_port: Final = resolve_port(http_port)
        self._server: grpc.aio.Server | None = None
        self._http: asyncio.Server | None = None
        self.spans_received = 0

    @property
    def grpc_endpoint(self) -> str:
        """For ``OTEL_EXPORTER_OTLP_ENDPOINT`` (OTLP/gRPC)."""
        return f"http://{LOOPBACK}:{self.grpc_port}"

    @property
    def http_traces_url(self) -> str:
        """Where OTLP/HTTP exporters post (Triton's ``opentelemetry,url=``)."""
        return f"http://{LOOPBACK}:{self.http_port}/v1/traces"

    @property
    def spans_path(self) -> Path:
        """The file spans are appended to."""
        return self.store_dir / SPANS_FILE

    async def __aenter__(self) -> OtlpReceiver:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _TraceService(self), server
        )
        if server.add_insecure_port(f"{LOOPBACK}:{self.grpc_port}") == 0:
            raise OSError(f"cannot bind the trace receiver to {LOOPBACK}:{self.grpc_port}")
        await server.start()
        self._server = server
        try:
            self._http = await asyncio.start_server(self._serve_http, LOOPBACK, self.http_port)
        except BaseException:
            await server.stop(None)
            raise
        logger.info(
            "trace receiver on %s (gRPC), %s (HTTP)", self.grpc_endpoint, self.http_traces_url
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._http is not None:
            self._http.close()
            await self._http.wait_closed()
            self._http = None
        if self._server is not None:
            await self._server.stop(1.0)
            self._server = None

    def store(self, request: _Request) -> None:
        """Append every span of ``request`` to the spans file."""
        records = records_from_otlp(request)
        if not records:
            return
        with self.spans_path.open("a", encoding="utf-8") as fh:
            fh.write("".join(r.to_json() + "\n" for r in records))
        self.spans_received += len(records)

    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    return
                method, path, _ = request_line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    key, _, value = line.decode("latin-1").partition(":")
                    headers[key.strip().lower()] = value.strip()
                body = await _read_body(reader, headers)
                status, reply = self._http_reply(method, path, headers, body)
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: {headers.get('content-type', 'application/x-protobuf')}\r\n"
                    f"Content-Length: {len(reply)}\r\n\r\n".encode("latin-1")
                    + reply
                )
                await writer.drain()
        except (ConnectionError, ValueError, asyncio.IncompleteReadError) as exc:
            logger.debug("trace receiver: dropped an HTTP connection: %s", exc)
        finally:
            writer.close()

    def _http_reply(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[str, bytes]:
        if method != "POST" or path.split("?")[0] != "/v1/traces":
            return "404 Not Found", b""
        request = _Request()
        json_body = "json" in headers.get("content-type", "")
        try:
            if json_body:
                json_format.ParseDict(
                    _hex_ids_to_base64(json.loads(body)), request, ignore_unknown_fields=True
                )
            else:
                request.ParseFromString(body)
        except (DecodeError, json_format.ParseError, ValueError) as exc:
            logger.debug("trace receiver: undecodable export: %s", exc)
            return "400 Bad Request", b""
        self.store(request)
        return "200 OK", (b"{}" if json_body else b"")


_ID_FIELDS: Final = ("traceId", "spanId", "parentSpanId")


def _hex_ids_to_base64(export: Any) -> Any:
    """OTLP/JSON writes span and trace ids in hex, where protobuf's JSON mapping expects base64
    for bytes fields: rewrite them so ``json_format`` decodes the true ids."""
    for resource_spans in export.get("resourceSpans", []):
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                for item in (span, *span.get("links", [])):
                    for key in _ID_FIELDS:
                        if item.get(key):
                            item[key] = base64.b64encode(bytes.fromhex(item[key])).decode()
    return export


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks: list[bytes] = []
        total = 0
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readline()  # the blank line after the last chunk
                return b"".join(chunks)
            total += size
            if total > _MAX_BODY_BYTES:
                raise ValueError("export body too large")
            chunks.append(await reader.readexactly(size))
            await reader.readline()
    length = int(headers.get("content-length", "0"))
    if length > _MAX_BODY_BYTES:
        raise ValueError("export body too large")
    return await reader.readexactly(length)


async def wait_for_services(
    store_dir: Path, wanted: Mapping[str, set[str]], *, at_least_s: float, at_most_s: float
) -> bool:
    """Wait until each trace in ``wanted`` has a span from each of its services (and at least
    ``at_least_s`` has passed), at most ``at_most_s``; whether they all came. Exporters send in
    batches every 200 ms, later on a busy machine, so a fixed pause lost Triton's spans."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        missing = {
            trace_id: services - {span.service for span in read_trace(store_dir, trace_id)}
            for trace_id, services in wanted.items()
        }
        waited = loop.time() - start
        if waited >= at_least_s and not any(missing.values()):
            return True
        if waited >= at_most_s:
            return False
        await asyncio.sleep(0.1)


def read_trace(store_dir: Path, trace_id: str) -> list[SpanRecord]:
    """Every stored span of ``trace_id`` (32 hex chars), in file order."""
    path = store_dir / SPANS_FILE
    wanted = trace_id.lower()
    spans = []
    try:
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if wanted in line:
                    try:
                        record = parse_record(line)
                    except ValueError:
                        continue
                    if record.trace_id == wanted:
                        spans.append(record)
    except FileNotFoundError:
        return []
    return spans
