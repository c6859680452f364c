"""The screening worker: answers ``{prefix}.{model_version}`` requests in a NATS queue group.

The model is loaded and warmed before the worker subscribes, so a worker that is listening can
always answer at full speed. Every request gets a reply: scores, or an ``error`` naming the
problem (wrong model version, wrong feature count, undecodable message). The worker continues the
caller's trace from the W3C headers on the NATS message when spans are being recorded.

Each message is scored straight from the subscription's callback: no queue of our own, no task
hop, no wait for company. Batching happens where it pays, in the orchestrator, which coalesces
concurrent calls into one message of many rows (:mod:`orchestrator.coalescing`). nats-py runs a
subscription's callbacks one at a time, so messages that arrive while one is scored wait in its
pending queue and are answered in order.

Besides the queue group the worker listens alone on ``{subject}.w.{worker_id}`` and announces that
id on ``{subject}.members`` every ``heartbeat_s``: the orchestrator routes to workers it hears
from and around one that stops answering (:mod:`orchestrator.screening_routing`), which a queue
group alone does not do. On shutdown it says goodbye first, then drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Final

import nats
import numpy as np
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry import trace

from cascade import metrics
from cascade.nats_connection import connect_nats
from cascade.screening_protocol import (
    ScreeningRequest,
    encode_heartbeat,
    encode_screening_reply,
    encode_screening_request,
    members_subject,
    parse_screening_request,
    screening_subject,
    worker_id_for,
    worker_subject,
)
from cascade.settings import NatsSettings
from cascade.telemetry import extract_context, records_spans
from stages.screening.model import ScreeningModel

logger = logging.getLogger(__name__)

_READY_PROBE_TIMEOUT_S: Final = 10.0


@dataclass(slots=True)
class WorkerStats:
    """Counters for monitoring and for the batching report."""

    requests: int = 0
    rows: int = 0
    errors: int = 0


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
        heartbeat_s: float | None = 0.25,
        nats_security: NatsSettings | None = None,
    ) -> None:
        self._model = model
        self._url = nats_url
        self._security = nats_security
        self.subject = screening_subject(subject_prefix, model.version)
        self._queue_group = queue_group
        self._feature_set = feature_set
        self._tracer = tracer
        self._record_spans = records_spans(tracer)
        self._nc: NatsClient | None = None
        self._sub: Subscription | None = None
        self._own_sub: Subscription | None = None
        self._heartbeat_s = heartbeat_s
        self._heartbeats: asyncio.Task[None] | None = None
        self.worker_id = worker_id_for(socket.gethostname(), os.getpid(), secrets.token_hex(3))
        """This worker's id: its own subject's last token, and what its heartbeats carry."""
        self._answered_ok = metrics.WORKER_REQUESTS.labels("ok")
        self._answered_error = metrics.WORKER_REQUESTS.labels("error")
        self.stats = WorkerStats()

    async def __aenter__(self) -> ScreeningWorker:
        try:
            return await self._start()
        except BaseException:
            # A start cut short (cancelled, or the probe unanswered) leaves no connection open;
            # nothing was answered yet, so there is nothing to drain.
            nc, self._nc = self._nc, None
            if nc is not None:
                with contextlib.suppress(Exception):
                    await nc.close()
            raise

    async def _start(self) -> ScreeningWorker:
        self._model.warm()
        self._nc = await connect_nats(
            self._url, name=f"screening-worker-{self._model.version}", security=self._security
        )
        self._sub = await self._nc.subscribe(self.subject, queue=self._queue_group, cb=self._answer)
        if self._heartbeat_s is not None:
            self._own_sub = await self._nc.subscribe(
                worker_subject(self.subject, self.worker_id), cb=self._answer
            )
        await self._nc.flush()
        await self._prove_answering(self._nc)
        if self._heartbeat_s is not None:
            self._heartbeats = asyncio.create_task(
                self._beat(self._nc, self._heartbeat_s), name="screening-heartbeats"
            )
        metrics.MODELS.info(
            {"role": "screening", "stage1": self._model.version, "feature_set": self._feature_set}
        )
        logger.info(
            "screening worker serving %s (features %s) on %s",
            self._model.version,
            self._feature_set,
            self.subject,
        )
        return self

    async def _prove_answering(self, nc: NatsClient) -> None:
        """Send one request on our subject after subscribing, so "ready" means requests there are
        answered (by us, or by a sibling in the queue group).

        A first request that raced a new worker's subscription was once answered "no
        responders" in a test; this closes that window for whoever waits on the READY line.
        """
        probe = encode_screening_request(
            np.zeros((1, self._model.n_features), dtype=np.float32),
            self._model.version,
            self._feature_set,
        )
        async with asyncio.timeout(_READY_PROBE_TIMEOUT_S):
            while True:
                try:
                    await nc.request(self.subject, probe, timeout=1.0)
                    break
                except nats.errors.NoRespondersError:
                    await asyncio.sleep(0.01)
        self.stats = WorkerStats()  # the probe is not traffic

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Order matters: say goodbye (orchestrators stop routing here), stop new deliveries and
        # answer everything already delivered (draining a subscription runs its pending
        # callbacks) while the connection is still up, then flush and close the connection.
        if self._heartbeats is not None:
            self._heartbeats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeats
            self._heartbeats = None
            if self._nc is not None and self._nc.is_connected:
                with contextlib.suppress(Exception):  # best effort: the heartbeats stop anyway
                    await self._nc.publish(
                        members_subject(self.subject),
                        encode_heartbeat(self.worker_id, leaving=True),
                    )
        for sub in (self._own_sub, self._sub):
            if sub is not None:
                await sub.drain()  # type: ignore[no-untyped-call]  # nats-py is untyped here
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            await nc.drain()

    async def _beat(self, nc: NatsClient, every_s: float) -> None:
        subject = members_subject(self.subject)
        beat = encode_heartbeat(self.worker_id)
        while True:
            try:
                await nc.publish(subject, beat)
            except Exception as exc:  # reconnecting: the next beat will do
                logger.debug("heartbeat not sent: %s", exc)
            await asyncio.sleep(every_s)

    async def _answer(self, msg: Msg) -> None:
        try:
            reply = self._reply_to(msg)
        except Exception:  # one bad message must not stop the worker
            logger.exception("screening request failed")
            self.stats.errors += 1
            reply = encode_screening_reply(self._model.version, error="internal error")
        try:
            await msg.respond(reply)
        except Exception:  # a reply that cannot be sent has nobody left to tell
            logger.exception("could not send a screening reply")

    def _reply_to(self, msg: Msg) -> bytes:
        version = self._model.version
        problem, request = self._check(msg.data)
        if request is None:
            self.stats.errors += 1
            self._answered_error.inc()
            return encode_screening_reply(version, error=problem)
        span = None
        if self._record_spans:
            span = self._tracer.start_span(
                "screening.score",
                context=extract_context(msg.headers),
                kind=trace.SpanKind.CONSUMER,
                attributes={
                    "messaging.system": "nats",
                    "cascade.model_version": version,
                    "cascade.batch_rows": int(request.rows.shape[0]),
                },
            )
        start_ns = time.perf_counter_ns()
        scores = self._model.predict(request.rows)
        inference_us = (time.perf_counter_ns() - start_ns) // 1000
        if span is not None:
            span.end()
        self.stats.requests += 1
        self.stats.rows += request.rows.shape[0]
        metrics.WORKER_BATCH_ROWS.observe(request.rows.shape[0])
        self._answered_ok.inc()
        return encode_screening_reply(version, scores, inference_us=inference_us)

    def _check(self, data: bytes) -> tuple[str, ScreeningRequest | None]:
        try:
            request = parse_screening_request(data)
        except ValueError as exc:
            return f"bad request: {exc}", None
        if request.model_version != self._model.version:
            return f"model version {request.model_version!r} is not served here", None
        if request.feature_set != self._feature_set:
            return f"feature set {request.feature_set!r} != {self._feature_set!r}", None
        if request.rows.shape[1] != self._model.n_features:
            return (
                f"{request.rows.shape[1]} features per row; model takes {self._model.n_features}",
                None,
            )
        return "", request
