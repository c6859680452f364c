"""The screening worker: answers ``{prefix}.{model_version}`` requests in a NATS queue group.

The model is loaded and warmed before the worker subscribes, so a worker that is listening can
always answer at full speed. Every request gets a reply: scores, or an ``error`` naming the
problem (wrong model version, wrong feature count, undecodable message). The worker continues the
caller's trace from the W3C headers on the NATS message.

Adaptive micro-batching: the NATS callback only queues the message; one owned batcher task takes
everything that queued up while the previous batch ran and scores it in one ONNX Runtime call.
At low load a batch is one request and nothing waits; as load grows, batches grow by themselves.
When the last batch was larger than one, the batcher also lingers up to ``max_window_us`` for
more, a window far inside stage 1's share of the budget (15 ms by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Final

import nats
import numpy as np
import numpy.typing as npt
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry import trace

from cascade import metrics
from cascade.screening_protocol import (
    ScreeningRequest,
    encode_screening_reply,
    encode_screening_request,
    parse_screening_request,
    screening_subject,
)
from cascade.telemetry import extract_context
from stages.screening.model import ScreeningModel

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_ROWS: Final = 256
DEFAULT_MAX_WINDOW_US: Final = 300
_READY_PROBE_TIMEOUT_S: Final = 10.0


@dataclass(slots=True)
class WorkerStats:
    """Counters for monitoring and for the batching report."""

    requests: int = 0
    batches: int = 0
    rows: int = 0
    errors: int = 0


@dataclass(slots=True)
class _Pending:
    msg: Msg
    request: ScreeningRequest


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
        max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
        max_window_us: int = DEFAULT_MAX_WINDOW_US,
    ) -> None:
        self._model = model
        self._url = nats_url
        self.subject = screening_subject(subject_prefix, model.version)
        self._queue_group = queue_group
        self._feature_set = feature_set
        self._tracer = tracer
        self._max_batch_rows = max_batch_rows
        self._max_window_s = max_window_us / 1e6
        self._inbox: asyncio.Queue[Msg] = asyncio.Queue()
        self._nc: NatsClient | None = None
        self._sub: Subscription | None = None
        self._batcher: asyncio.Task[None] | None = None
        self.stats = WorkerStats()

    async def __aenter__(self) -> ScreeningWorker:
        self._model.warm()
        self._batcher = asyncio.create_task(self._run_batches(), name="screening-batcher")
        self._nc = await nats.connect(
            self._url, name=f"screening-worker-{self._model.version}", max_reconnect_attempts=-1
        )
        self._sub = await self._nc.subscribe(
            self.subject, queue=self._queue_group, cb=self._enqueue
        )
        await self._nc.flush()
        await self._prove_answering(self._nc)
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
        await self._inbox.join()
        self.stats = WorkerStats()  # the probe is not traffic

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Order matters: stop new deliveries, answer everything already queued while the
        # connection is still up, then flush and close the connection, then stop the batcher.
        if self._sub is not None:
            await self._sub.drain()  # type: ignore[no-untyped-call]  # nats-py is untyped here
        await self._inbox.join()
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            await nc.drain()
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await batcher

    async def _enqueue(self, msg: Msg) -> None:
        self._inbox.put_nowait(msg)

    async def _run_batches(self) -> None:
        last_batch = 1
        while True:
            msgs = [await self._inbox.get()]
            if last_batch > 1 and self._inbox.empty() and self._max_window_s > 0:
                # Load is high enough that requests overlap: wait a moment for company.
                await asyncio.sleep(self._max_window_s)
            while not self._inbox.empty() and len(msgs) < self._max_batch_rows:
                msgs.append(self._inbox.get_nowait())
            try:
                await self._answer(msgs)
            except Exception:  # one bad batch must not stop the worker
                logger.exception("screening batch failed")
                self.stats.errors += len(msgs)
            finally:
                for _ in msgs:
                    self._inbox.task_done()
            last_batch = len(msgs)

    async def _answer(self, msgs: list[Msg]) -> None:
        version = self._model.version
        ok: list[_Pending] = []
        for msg in msgs:
            problem, request = self._check(msg.data)
            if request is None:
                self.stats.errors += 1
                metrics.WORKER_REQUESTS.labels("error").inc()
                await self._respond(msg, encode_screening_reply(version, error=problem))
            else:
                ok.append(_Pending(msg, request))
        if not ok:
            return
        spans = [
            self._tracer.start_span(
                "screening.score",
                context=extract_context(p.msg.headers),
                kind=trace.SpanKind.CONSUMER,
                attributes={"messaging.system": "nats", "cascade.model_version": version},
            )
            for p in ok
        ]
        rows: npt.NDArray[np.float32] = (
            ok[0].request.rows
            if len(ok) == 1
            else np.concatenate([p.request.rows for p in ok], axis=0)
        )
        start_ns = time.perf_counter_ns()
        scores = self._model.predict(rows)
        inference_us = (time.perf_counter_ns() - start_ns) // 1000
        self.stats.batches += 1
        self.stats.rows += rows.shape[0]
        metrics.WORKER_BATCH_ROWS.observe(rows.shape[0])
        metrics.WORKER_REQUESTS.labels("ok").inc(len(ok))
        offset = 0
        for pending, span in zip(ok, spans, strict=True):
            n = pending.request.rows.shape[0]
            if span.is_recording():
                span.set_attribute("cascade.batch_rows", int(rows.shape[0]))
            span.end()
            reply = encode_screening_reply(
                version, scores[offset : offset + n], inference_us=inference_us
            )
            offset += n
            self.stats.requests += 1
            await self._respond(pending.msg, reply)

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

    @staticmethod
    async def _respond(msg: Msg, reply: bytes) -> None:
        try:
            await msg.respond(reply)
        except Exception:  # a reply that cannot be sent has nobody left to tell
            logger.exception("could not send a screening reply")
