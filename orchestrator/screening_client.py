"""Stage 1 client: feature rows to the screening workers over NATS request-reply.

The request goes to ``{prefix}.{model_version}``; the workers share a queue group, so NATS hands
each request to one of them. With nobody listening NATS answers "no responders" at once, which we
report as unavailable rather than waiting out the timeout. While the connection to NATS is down
(the client reconnects by itself, :mod:`cascade.nats_connection`) a request fails at once as
unavailable too: nats-py would buffer it until the reconnect, long after its caller gave up, and
then flood the workers with stale requests just when they are needed again.
"""

from __future__ import annotations

from types import TracebackType
from typing import Protocol

import numpy as np
import numpy.typing as npt
from nats.aio.client import Client as NatsClient
from opentelemetry import trace

from cascade.errors import (
    Dependency,
    DependencyFailed,
    DependencyUnavailable,
    translate_nats_errors,
)
from cascade.nats_connection import connect_nats
from cascade.screening_protocol import (
    encode_screening_request,
    parse_screening_reply,
    screening_subject,
)
from cascade.telemetry import inject_headers, records_spans
from orchestrator.stage_twin import ScoreFn, StageTwin


class Screener(Protocol):
    """Scores feature rows with the stage-1 model."""

    async def screen(
        self, rows: npt.NDArray[np.float32], timeout_s: float
    ) -> npt.NDArray[np.float32]:
        """One score per row; raise a ``DependencyError`` on failure or timeout."""
        ...


class NatsScreener:
    """:class:`Screener` over NATS; owns its connection (use as an async context manager)."""

    def __init__(
        self,
        url: str,
        *,
        subject_prefix: str,
        model_version: str,
        feature_set: str,
        tracer: trace.Tracer,
    ) -> None:
        self._url = url
        self._subject = screening_subject(subject_prefix, model_version)
        self._model_version = model_version
        self._feature_set = feature_set
        self._tracer = tracer
        self._spans = records_spans(tracer)
        self._nc: NatsClient | None = None

    async def __aenter__(self) -> NatsScreener:
        with translate_nats_errors():
            self._nc = await connect_nats(self._url, name="cascade-orchestrator")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._nc is not None:
            await self._nc.close()
            self._nc = None

    async def screen(
        self, rows: npt.NDArray[np.float32], timeout_s: float
    ) -> npt.NDArray[np.float32]:
        """Request scores for ``rows`` from one worker of the queue group."""
        nc = self._nc
        if nc is None:
            raise RuntimeError("NatsScreener used outside its async with block")
        if not nc.is_connected:
            raise DependencyUnavailable(Dependency.SCREENING, "not connected to NATS")
        payload = encode_screening_request(rows, self._model_version, self._feature_set)
        headers: dict[str, str] = {}
        if not self._spans:
            inject_headers(headers)  # the call's (non-recording) context still propagates
            with translate_nats_errors():
                msg = await nc.request(self._subject, payload, timeout=timeout_s, headers=headers)
        else:
            with self._tracer.start_as_current_span(
                "stage1.screen",
                kind=trace.SpanKind.CLIENT,
                attributes={
                    "messaging.system": "nats",
                    "messaging.destination.name": self._subject,
                },
            ):
                inject_headers(headers)
                with translate_nats_errors():
                    msg = await nc.request(
                        self._subject, payload, timeout=timeout_s, headers=headers
                    )
        try:
            reply = parse_screening_reply(msg.data)
        except ValueError as exc:
            raise DependencyFailed(Dependency.SCREENING, str(exc)) from exc
        if reply.error:
            raise DependencyFailed(Dependency.SCREENING, reply.error)
        if reply.scores.shape[0] != rows.shape[0]:
            raise DependencyFailed(
                Dependency.SCREENING, f"{reply.scores.shape[0]} scores for {rows.shape[0]} rows"
            )
        return reply.scores

    @property
    def connected(self) -> bool:
        """True while the connection to NATS is up (a reconnect may be under way otherwise)."""
        return self._nc is not None and self._nc.is_connected


class InMemoryScreener(StageTwin):
    """Twin of :class:`NatsScreener` for unit tests (see :class:`StageTwin`)."""

    def __init__(
        self, score_fn: ScoreFn, *, delay_s: float = 0.0, failure: Exception | None = None
    ) -> None:
        super().__init__(Dependency.SCREENING, score_fn, delay_s=delay_s, failure=failure)

    async def screen(
        self, rows: npt.NDArray[np.float32], timeout_s: float
    ) -> npt.NDArray[np.float32]:
        """One score per row, as :meth:`NatsScreener.screen`."""
        return await self.run(rows, timeout_s)
