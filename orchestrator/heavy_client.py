"""Stage 2 client: card sequences to the heavyweight model on Triton over gRPC.

Uses ``tritonclient.grpc.aio`` and carries the W3C trace context in the gRPC metadata. The
deadline travels to Triton as ``client_timeout`` (so Triton can drop expired work), but the wait
ends on a local event-loop timer: both the gRPC deadline and cancelling an in-flight grpc.aio call
were measured to take 1.5-2 ms too long here, a lot out of a 50 ms budget. So at the deadline we
stop waiting, raise, and let the call end on its own deadline as a task this client owns and
reaps (and cancels on close).

After Triton went away, gRPC's default reconnect backoff (1 s growing 1.6x per failed attempt,
up to 2 min) kept the channel refusing calls for seconds after Triton was back (7 s after an 8 s
outage, measured); :data:`CHANNEL_ARGS` caps it at a quarter second, so stage 2 answers again
within ~0.3 s of Triton's return. A call made while the channel is down fails at once
(UNAVAILABLE: no wait-for-ready), so the caller still gets stage 1's answer in time.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt
from opentelemetry import trace
from tritonclient.grpc import (
    MAX_GRPC_MESSAGE_SIZE,
    InferInput,
    InferRequestedOutput,
    InferResult,
    KeepAliveOptions,
)
from tritonclient.grpc.aio import InferenceServerClient

from cascade.errors import Dependency, DependencyFailed, DependencyTimeout, translate_triton_errors
from cascade.telemetry import inject_headers, records_spans
from orchestrator.stage_twin import ScoreFn, StageTwin

INPUT_NAME: Final = "sequence"
OUTPUT_NAME: Final = "score"
_RECONNECT_BACKOFF_MS: Final = 100
_MAX_RECONNECT_BACKOFF_MS: Final = 250


def _channel_args() -> list[tuple[str, int]]:
    keepalive = KeepAliveOptions()
    return [
        # tritonclient's own defaults (replaced as a whole when channel_args is given) ...
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", int(keepalive.keepalive_permit_without_calls)),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        # ... and a reconnect backoff short enough to notice Triton's return promptly.
        ("grpc.initial_reconnect_backoff_ms", _RECONNECT_BACKOFF_MS),
        ("grpc.min_reconnect_backoff_ms", _RECONNECT_BACKOFF_MS),
        ("grpc.max_reconnect_backoff_ms", _MAX_RECONNECT_BACKOFF_MS),
    ]


CHANNEL_ARGS: Final = _channel_args()


class HeavyScorer(Protocol):
    """Scores card sequences with the stage-2 model."""

    async def score(
        self, sequences: npt.NDArray[np.float32], timeout_s: float
    ) -> npt.NDArray[np.float32]:
        """One score per sequence; raise a ``DependencyError`` on failure or timeout."""
        ...


class TritonHeavyScorer:
    """:class:`HeavyScorer` on Triton; owns its gRPC channel (use as an async context manager)."""

    def __init__(
        self, url: str, *, model_name: str, model_version: str, tracer: trace.Tracer
    ) -> None:
        self._client = InferenceServerClient(url, channel_args=CHANNEL_ARGS)
        self._model_name = model_name
        self._model_version = model_version
        self._tracer = tracer
        self._spans = records_spans(tracer)
        self._outputs = [InferRequestedOutput(OUTPUT_NAME)]
        self._abandoned: set[asyncio.Task[InferResult]] = set()

    async def __aenter__(self) -> TritonHeavyScorer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for task in list(self._abandoned):
            task.cancel()
        await asyncio.gather(*self._abandoned, return_exceptions=True)
        await self._client.close()

    def _abandon(self, task: asyncio.Task[InferResult]) -> None:
        # Not cancelled: the call carries the same gRPC deadline and ends by itself a moment
        # later, whereas cancelling it here costs the event loop time the answer needs.
        self._abandoned.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[InferResult]) -> None:
        self._abandoned.discard(task)
        if not task.cancelled():
            task.exception()  # mark it retrieved: an abandoned call's error is expected, not news

    async def _infer(self, infer_input: InferInput, timeout_s: float) -> InferResult:
        headers: dict[str, str] = {}
        inject_headers(headers)  # the current context, recording or not
        call = asyncio.ensure_future(
            self._client.infer(
                self._model_name,
                [infer_input],
                model_version=self._model_version,
                outputs=self._outputs,
                client_timeout=timeout_s,
                headers=headers,
            )
        )
        try:
            done, _ = await asyncio.wait((call,), timeout=timeout_s)
        except asyncio.CancelledError:
            call.cancel()  # our caller gave up (shutdown, guard): nothing waits for this call
            self._abandon(call)
            raise
        if not done:
            self._abandon(call)
            raise DependencyTimeout(Dependency.HEAVY, "no answer in time")
        with translate_triton_errors():
            return call.result()

    async def score(
        self, sequences: npt.NDArray[np.float32], timeout_s: float
    ) -> npt.NDArray[np.float32]:
        """Infer ``sequences`` [n, L, D]; returns [n] scores."""
        infer_input = InferInput(INPUT_NAME, list(sequences.shape), "FP32")
        infer_input.set_data_from_numpy(np.ascontiguousarray(sequences, dtype=np.float32))
        if not self._spans:
            result = await self._infer(infer_input, timeout_s)
        else:
            with self._tracer.start_as_current_span(
                "stage2.infer",
                kind=trace.SpanKind.CLIENT,
                attributes={"rpc.system": "grpc", "triton.model": self._model_name},
            ):
                result = await self._infer(infer_input, timeout_s)
        scores = result.as_numpy(OUTPUT_NAME)
        if scores is None or scores.shape[0] != sequences.shape[0]:
            raise DependencyFailed(Dependency.HEAVY, "Triton returned no usable 'score' output")
        return np.asarray(scores, dtype=np.float32).reshape(sequences.shape[0])


class InMemoryHeavyScorer(StageTwin):
    """Twin of :class:`TritonHeavyScorer` for unit tests (see :class:`StageTwin`)."""

    def __init__(
        self, score_fn: ScoreFn, *, delay_s: float = 0.0, failure: Exception | None = None
    ) -> None:
        super().__init__(Dependency.HEAVY, score_fn, delay_s=delay_s, failure=failure)

    async def score(
        self, sequences: npt.NDArray[np.float32], timeout_s: float
    ) -> npt.NDArray[np.float32]:
        """One score per sequence, as :meth:`TritonHeavyScorer.score`."""
        return await self.run(sequences, timeout_s)
