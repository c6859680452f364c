"""The screening worker: answers ``{prefix}.{model_version}`` requests in a NATS queue group.

The model is loaded and warmed before the worker subscribes, so a worker that is listening can
always answer at full speed. Every request gets a reply: scores, or an ``error`` naming the
problem (wrong model version, wrong feature count, undecodable message). The worker continues the
caller's trace from the W3C headers on the NATS message.
"""

from __future__ import annotations

import logging
import time
from types import TracebackType

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry import trace

from cascade.screening_protocol import (
    encode_screening_reply,
    parse_screening_request,
    screening_subject,
)
from cascade.telemetry import extract_context
from stages.screening.model import ScreeningModel

logger = logging.getLogger(__name__)


class ScreeningWorker:
    """One queue-group member serving ``model``; an async context manager."""

    def __init__(
        self,
        model: ScreeningModel,
        *,
        nats_url: str,
        subject_prefix: str,
        queue_group: str,
        feature_set: str,
        tracer: trace.Tracer,
    ) -> None:
        self._model = model
        self._url = nats_url
        self.subject = screening_subject(subject_prefix, model.version)
        self._queue_group = queue_group
        self._feature_set = feature_set
        self._tracer = tracer
        self._nc: NatsClient | None = None
        self._sub: Subscription | None = None
        self.requests_served = 0

    async def __aenter__(self) -> ScreeningWorker:
        self._model.warm()
        self._nc = await nats.connect(
            self._url, name=f"screening-worker-{self._model.version}", max_reconnect_attempts=-1
        )
        self._sub = await self._nc.subscribe(self.subject, queue=self._queue_group, cb=self._handle)
        await self._nc.flush()
        logger.info("screening worker serving %s on %s", self._model.version, self.subject)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            # drain(): stop receiving, answer what is already delivered, then close.
            await nc.drain()

    async def _handle(self, msg: Msg) -> None:
        parent = extract_context(msg.headers)
        with self._tracer.start_as_current_span(
            "screening.score",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes={"messaging.system": "nats", "cascade.model_version": self._model.version},
        ) as span:
            reply = self._score(msg.data)
            if span.is_recording():
                span.set_attribute("cascade.reply_bytes", len(reply))
        try:
            await msg.respond(reply)
        except Exception:  # a reply that cannot be sent has nobody left to tell
            logger.exception("could not send a screening reply")

    def _score(self, data: bytes) -> bytes:
        version = self._model.version
        try:
            request = parse_screening_request(data)
        except ValueError as exc:
            return encode_screening_reply(version, error=f"bad request: {exc}")
        if request.model_version != version:
            return encode_screening_reply(
                version, error=f"model version {request.model_version!r} is not served here"
            )
        if request.feature_set != self._feature_set:
            return encode_screening_reply(
                version, error=f"feature set {request.feature_set!r} != {self._feature_set!r}"
            )
        if request.rows.shape[1] != self._model.n_features:
            return encode_screening_reply(
                version,
                error=f"{request.rows.shape[1]} features per row; model takes {self._model.n_features}",
            )
        start_ns = time.perf_counter_ns()
        scores = self._model.predict(request.rows)
        self.requests_served += 1
        return encode_screening_reply(
            version, scores, inference_us=(time.perf_counter_ns() - start_ns) // 1000
        )
