"""The naive screening worker: JSON over NATS request-reply, one ONNX Runtime call per message."""

from __future__ import annotations

import logging
import time
from types import TracebackType

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from cascade.screening_protocol import screening_subject
from loadtests.naive.protocol import encode_reply, parse_request
from stages.screening.model import ScreeningModel

__all__ = ["NaiveScreeningWorker"]

logger = logging.getLogger(__name__)


class NaiveScreeningWorker:
    """Answers ``{prefix}.{model_version}`` in ``queue_group``; an async context manager."""

    def __init__(
        self,
        model: ScreeningModel,
        *,
        nats_url: str,
        subject_prefix: str,
        queue_group: str,
        feature_set: str,
    ) -> None:
        self._model = model
        self._url = nats_url
        self.subject = screening_subject(subject_prefix, model.version)
        self._queue_group = queue_group
        self._feature_set = feature_set
        self._nc: NatsClient | None = None

    async def __aenter__(self) -> NaiveScreeningWorker:
        self._nc = await nats.connect(self._url, name="naive-screening-worker")
        await self._nc.subscribe(self.subject, queue=self._queue_group, cb=self._handle)
        await self._nc.flush()
        logger.info("naive screening worker serving %s", self.subject)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            await nc.drain()

    async def _handle(self, msg: Msg) -> None:
        try:
            await msg.respond(self.score(msg.data))
        except Exception:  # a reply that cannot be sent has nobody left to tell
            logger.exception("could not send a screening reply")

    def score(self, data: bytes) -> bytes:
        """The JSON reply to one JSON request (an ``error`` reply for anything unusable)."""
        version = self._model.version
        try:
            request = parse_request(data)
        except ValueError as exc:
            return encode_reply(version, error=f"bad request: {exc}")
        if request.model_version != version or request.feature_set != self._feature_set:
            return encode_reply(version, error="model version or feature set not served here")
        if request.rows.shape[1] != self._model.n_features:
            return encode_reply(version, error=f"{request.rows.shape[1]} features per row")
        start_ns = time.perf_counter_ns()
        scores = self._model.predict(request.rows)
        return encode_reply(
            version, scores, inference_us=(time.perf_counter_ns() - start_ns) // 1000
        )
