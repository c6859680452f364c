"""The orchestrator's gRPC server: ``cascade.v1.ScoringService`` plus health and reflection.

:class:`Orchestrator` is one async context manager that opens every client (Redis, NATS, Triton),
the post-answer writer, the decision log (:mod:`orchestrator.decision_log`: every answer handed
to it, off the request path) and the grpc.aio server, and closes them in reverse order. Health reports
NOT_SERVING until a warm-up request has gone through stage 1 and stage 2, and again from the
moment a drain starts.

After warm-up, health follows whether a useful answer is possible: only stage 1 decides that
(without it every answer is the configured default; without Redis or Triton answers are still
scored, labelled). A readiness task probes stage 1 twice a second, off the request path, with one
tiny screening request (or none while the NATS connection is down): NOT_SERVING after two failed
rounds in a row, SERVING again at the first success.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, AsyncExitStack
from typing import Final, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import Counter

from cascade import metrics
from cascade.decision_record import METHOD_SCORE, METHOD_SCORE_BATCH
from cascade.errors import (
    CallerError,
    CascadeError,
    ConfigurationError,
    DependencyError,
    InvalidInputError,
    QuotaExceededError,
    grpc_status_for,
)
from cascade.features import FEATURE_SET_VERSION, N_SCREENING_FEATURES
from cascade.lifecycle import AsyncResourceGroup, cancel_and_wait
from cascade.model_registry import Registry, load_policy, load_registry
from cascade.outcome_record import VIA_GRPC, validate_outcome
from cascade.outcome_store import OutcomeStore
from cascade.pseudonym import Pseudonymizer, from_settings
from cascade.registry_watch import RegistryWatch
from cascade.runtime import freeze_heap
from cascade.settings import Settings
from cascade.telemetry import extract_context, records_spans, trace_id_hex, untraced_span
from cascade.throttled_log import ThrottledLog
from cascade.transaction import Channel, Transaction
from cascade.v1 import scoring_pb2, scoring_pb2_grpc
from orchestrator.admission import Admission
from orchestrator.budget import Budget
from orchestrator.callers import CallerGuard, guard_needed
from orchestrator.cluster_store import RedisClusterOnlineStore
from orchestrator.codec import MessageT, decode_request, result_to_proto
from orchestrator.decision_log import DecisionLog, JetStreamSink
from orchestrator.online_store import RedisOnlineStore
from orchestrator.post_answer import PostAnswerWriter
from orchestrator.reflection import enable_reflection
from orchestrator.results import DecidedBy, ModelVersions, Reason, ScoreResult, Timings
from orchestrator.rollout import (
    Generation,
    Lane,
    describe,
    lanes_answer,
    open_generation,
)
from orchestrator.routing import Decision
from orchestrator.scoring import CascadeScorer
from orchestrator.screening_client import NatsScreener
from orchestrator.tls import ReloadingCertificates, server_credentials
from orchestrator.validation import iter_batch, validate_request

logger = logging.getLogger(__name__)

RequestT = TypeVar("RequestT")
ValidT = TypeVar("ValidT")
ResponseT = TypeVar("ResponseT")
Handler = Callable[[RequestT, grpc.aio.ServicerContext], Awaitable[ResponseT]]

SERVICE_NAME: Final = scoring_pb2.DESCRIPTOR.services_by_name["ScoringService"].full_name
# Transactions of a ScoreBatch validated, pseudonymized or answered between two passes of the
# event loop (~0.3 ms of CPU: 15-20 us each on this machine).
BATCH_SLICE_ITEMS: Final = 16
_WARMUP_RETRY_S: Final = 0.2
_WARMUP_PASSES: Final = 5
_WARMUP_CARD: Final = "__cascade_warmup__"
_READINESS_INTERVAL_S: Final = 0.5
_READINESS_PROBE_TIMEOUT_S: Final = 0.25
# Tries per round: with one of two workers stalled a single probe fails half the time.
_READINESS_TRIES: Final = 3
_READINESS_FAILED_ROUNDS: Final = 2


def _warmup_transaction(i: int) -> Transaction:
    return Transaction(
        transaction_id=f"warmup-{i}",
        card_id=_WARMUP_CARD,
        merchant_id="warmup",
        merchant_category="5411",
        amount_minor=1000 + i,
        currency="EUR",
        country="DE",
        channel=Channel.CARD_PRESENT,
        timestamp_ms=int(time.time() * 1000),
    )


class ScoringServicer(scoring_pb2_grpc.ScoringServiceServicer):
    """Implements ``Score``: admit, validate, fix the budget, run the cascade, encode."""

    def __init__(
        self,
        generation: Generation,
        settings: Settings,
        tracer: trace.Tracer,
        admission: Admission,
        pseudonyms: Pseudonymizer,
        decisions: DecisionLog | None = None,
        outcomes: OutcomeStore | None = None,
    ) -> None:
        self.generation = generation
        """What serves: replaced as a whole when the registry changes (one attribute write)."""
        self._pseudonyms = pseudonyms
        self._decisions = decisions
        self._outcomes = outcomes
        self._settings = settings
        self._tracer = tracer
        self._spans = records_spans(tracer)
        self._admission = admission
        self._defer = admission.defer if settings.coalescing.batch_defers else None
        # Batches take turns: the chunks of one run between Score calls; two at once at most.
        self._batch_slots = asyncio.Semaphore(2)

    async def Score(
        self, request: scoring_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> scoring_pb2.ScoreResponse:
        """Score one transaction inside the caller's deadline and the configured SLO."""
        budget = Budget.start(context.time_remaining(), self._settings.budget)
        ticket = self._admission.admit(budget.remaining_ms())
        if ticket is None:
            return self._shed(request, budget)
        try:
            with self._span("cascade.Score", context) as span:
                tx = self._pseudonymized(
                    request.transaction,
                    await self._validated(validate_request, request, context, span),
                )
                generation = self.generation
                lane = (
                    generation.champion
                    if generation.candidate is None
                    else generation.lane_for(tx.card_id)
                )
                (result,) = await self._score(lane.scorer, [tx], budget, context)
                if generation.candidate is not None:
                    lane.count(result)
                if self._spans:
                    span.set_attribute("cascade.transaction_id", tx.transaction_id)
                    span.set_attribute("cascade.decision", result.decision.value)
                    span.set_attribute("cascade.decided_by", result.decided_by.value)
                    span.set_attribute("cascade.versions", lane.versions_attr)
                    if result.reasons:
                        span.set_attribute("cascade.reasons", [r.value for r in result.reasons])
                response = result_to_proto(result, lane.versions_pb, trace_id_hex(span))
                if self._decisions is not None:
                    self._decisions.record(
                        request.transaction, response, result.features, METHOD_SCORE
                    )
                return response
        finally:
            self._admission.release(ticket)

    def _shed(self, request: scoring_pb2.ScoreRequest, budget: Budget) -> scoring_pb2.ScoreResponse:
        """The default answer, labelled OVERLOADED, built without touching any dependency."""
        # Not validated, but pseudonymized all the same: the decision log records this call too.
        wire = request.transaction
        if wire.card_id:
            wire.card_id = self._pseudonyms.card(wire.card_id)
        if wire.device_id:
            wire.device_id = self._pseudonyms.device(wire.device_id)
        generation = self.generation
        lane = (
            generation.champion
            if generation.candidate is None
            else generation.lane_for(wire.card_id)
        )
        result = lane.scorer.default_answer(request.transaction.transaction_id, [Reason.OVERLOADED])
        result.timings = Timings.of(budget)
        record_metrics([result])
        if generation.candidate is not None:
            lane.count(result)
        response = result_to_proto(result, lane.versions_pb, "")
        if self._decisions is not None:
            self._decisions.record(request.transaction, response, None, METHOD_SCORE)
        return response

    async def ScoreBatch(
        self, request: scoring_pb2.ScoreBatchRequest, context: grpc.aio.ServicerContext
    ) -> scoring_pb2.ScoreBatchResponse:
        """Score many transactions in one pass of the cascade, a chunk at a time."""
        budget = Budget.start(context.time_remaining(), self._settings.budget, batch=True)
        with self._span("cascade.ScoreBatch", context) as span:
            txs = await self._valid_batch(request, context, span)
            if self._spans:
                span.set_attribute("cascade.batch_size", len(txs))
            generation = self.generation
            lanes = [generation.lane_for(tx.card_id) for tx in txs]
            try:
                async with asyncio.timeout(budget.remaining_ms() / 1000.0):
                    await self._batch_slots.acquire()
            except TimeoutError:
                results = [
                    lane.scorer.default_answer(tx.transaction_id, [Reason.OVERLOADED])
                    for tx, lane in zip(txs, lanes, strict=True)
                ]
            else:
                try:
                    results = await self._score_lanes(txs, lanes, budget, context)
                finally:
                    self._batch_slots.release()
            if generation.candidate is not None:
                for result, lane in zip(results, lanes, strict=True):
                    lane.count(result)
            return await self._batch_response(request, results, lanes, trace_id_hex(span))

    async def _valid_batch(
        self,
        request: scoring_pb2.ScoreBatchRequest,
        context: grpc.aio.ServicerContext,
        span: trace.Span,
    ) -> list[Transaction]:
        """The batch's transactions validated and pseudonymized, ``BATCH_SLICE_ITEMS`` at a
        time with the event loop let run in between: a 1000-item batch is 15-30 ms of this CPU,
        which at once would hold every concurrent Score call back that long."""
        txs: list[Transaction] = []
        try:
            for i, (wire, tx) in enumerate(
                zip(request.transactions, iter_batch(request), strict=True)
            ):
                txs.append(self._pseudonymized(wire, tx))
                if not (i + 1) % BATCH_SLICE_ITEMS:
                    await asyncio.sleep(0)
        except InvalidInputError as exc:
            span.set_status(trace.StatusCode.ERROR, str(exc))
            await _refuse(exc, context)
            raise  # unreachable: abort raises
        return txs

    async def _batch_response(
        self,
        request: scoring_pb2.ScoreBatchRequest,
        results: list[ScoreResult],
        lanes: list[Lane],
        trace_id: str,
    ) -> scoring_pb2.ScoreBatchResponse:
        """The batch's answers (each recorded in the decision log), built ``BATCH_SLICE_ITEMS``
        at a time with the event loop let run in between, as :meth:`_valid_batch` does."""
        out = scoring_pb2.ScoreBatchResponse()
        record = self._decisions.record if self._decisions is not None else None
        for start in range(0, len(results), BATCH_SLICE_ITEMS):
            if start:
                await asyncio.sleep(0)
            stop = start + BATCH_SLICE_ITEMS
            responses = [
                result_to_proto(r, lane.versions_pb, trace_id)
                for r, lane in zip(results[start:stop], lanes[start:stop], strict=True)
            ]
            if record is not None:
                for tx, result, response in zip(
                    request.transactions[start:stop], results[start:stop], responses, strict=True
                ):
                    record(tx, response, result.features, METHOD_SCORE_BATCH)
            out.results.extend(responses)
        return out

    async def ReportOutcome(
        self, request: scoring_pb2.ReportOutcomeRequest, context: grpc.aio.ServicerContext
    ) -> scoring_pb2.ReportOutcomeResponse:
        """Validate a label and store it on the outcome stream; answers once JetStream
        acknowledged it (its own connection: nothing here touches the scoring path)."""
        now_ms = int(time.time() * 1000)
        try:
            outcome = validate_outcome(request.outcome, now_ms=now_ms)
        except InvalidInputError as exc:
            await _refuse(exc, context)
            raise  # unreachable: abort raises
        if self._outcomes is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "outcomes are not enabled here")
            raise AssertionError("unreachable: abort raises")
        try:
            stored = await self._outcomes.store(outcome, now_ms, VIA_GRPC)
        except DependencyError as exc:
            await context.abort(grpc_status_for(exc), f"outcome not stored: {exc}")
            raise  # unreachable: abort raises
        return scoring_pb2.ReportOutcomeResponse(
            transaction_id=outcome.transaction_id, duplicate=stored.duplicate
        )

    def _span(
        self, name: str, context: grpc.aio.ServicerContext
    ) -> AbstractContextManager[trace.Span]:
        """The call's server span; when nothing records spans, a bare context carrying the
        caller's trace (or a new trace id) so it still propagates to the stages."""
        metadata = context.invocation_metadata() or ()
        if not self._spans:
            return trace.use_span(untraced_span(metadata), end_on_exit=False)
        parent = extract_context(dict(metadata))
        return self._tracer.start_as_current_span(name, context=parent, kind=trace.SpanKind.SERVER)

    def _pseudonymized(self, wire: scoring_pb2.Transaction, tx: Transaction) -> Transaction:
        """``tx`` with its card and device ids replaced by their tokens, written back into the
        request's own message too (two field writes), so nothing after this point (scoring,
        Redis, the decision log, spans, logs) sees the raw ids and none is hashed twice."""
        tx = self._pseudonyms.transaction(tx)
        wire.card_id = tx.card_id
        if tx.device_id:
            wire.device_id = tx.device_id
        return tx

    @staticmethod
    async def _validated(
        validate: Callable[[RequestT], ValidT],
        request: RequestT,
        context: grpc.aio.ServicerContext,
        span: trace.Span,
    ) -> ValidT:
        try:
            return validate(request)
        except InvalidInputError as exc:
            span.set_status(trace.StatusCode.ERROR, str(exc))
            await _refuse(exc, context)
            raise  # unreachable: abort raises

    async def _score_lanes(
        self,
        txs: list[Transaction],
        lanes: list[Lane],
        budget: Budget,
        context: grpc.aio.ServicerContext,
    ) -> list[ScoreResult]:
        """A batch's answers in order, each lane's transactions scored together by its scorer
        (a card is always in one lane, so each card's earlier transactions stay in its lane),
        the lanes at the same time: each has its own stage clients, and the batch's one budget
        is then not split between them."""
        first = lanes[0]
        if all(lane is first for lane in lanes):
            return await self._score(first.scorer, txs, budget, context)
        by_lane = {lane: [i for i, ln in enumerate(lanes) if ln is lane] for lane in lanes}
        parts = await asyncio.gather(
            *(
                self._score(lane.scorer, [txs[i] for i in positions], budget, context)
                for lane, positions in by_lane.items()
            ),
            return_exceptions=True,  # both lanes finish before a failure propagates
        )
        results: list[ScoreResult | None] = [None] * len(txs)
        for positions, part in zip(by_lane.values(), parts, strict=True):
            if isinstance(part, BaseException):
                raise part
            for i, result in zip(positions, part, strict=True):
                results[i] = result
        return [r for r in results if r is not None]

    async def _score(
        self,
        scorer: CascadeScorer,
        txs: list[Transaction],
        budget: Budget,
        context: grpc.aio.ServicerContext,
    ) -> list[ScoreResult]:
        # A backstop behind the budget: should the event loop stall, the caller still hears in
        # time. It fires halfway into the response margin, which is what the caller has left.
        # Besides it a call arms one timer per stage it waits on (a coalesced round arms one
        # for all its members).
        guard_s = (budget.total_ms + self._settings.budget.response_margin_ms / 2) / 1000.0
        try:
            async with asyncio.timeout(guard_s):
                if len(txs) == 1:
                    results = [await scorer.score(txs[0], budget)]
                else:
                    results = await scorer.score_many(txs, budget, self._defer)
        except TimeoutError:
            results = [
                scorer.default_answer(tx.transaction_id, [Reason.BUDGET_EXHAUSTED]) for tx in txs
            ]
            for result in results:
                result.timings = Timings.of(budget)
                result.timings.total_us = result.timings.budget_us
        except CascadeError as exc:  # the scorer labels dependency failures; this is a bug
            logger.exception("scoring failed")
            await context.abort(grpc_status_for(exc), str(exc))
        record_metrics(results)
        return results


async def _refuse(exc: InvalidInputError, context: grpc.aio.ServicerContext) -> None:
    """Count the refusal by field and end the call with the status ``exc`` maps to."""
    metrics.INVALID.labels(exc.field.split(".")[-1]).inc()
    await context.abort(grpc_status_for(exc), str(exc))


def _decoding(
    message: type[MessageT], handler: Handler[MessageT, ResponseT], undecodable: ThrottledLog
) -> Handler[bytes, ResponseT]:
    """``handler`` taking the raw request body: decoded here, so that an undecodable one is
    INVALID_ARGUMENT (grpc's own deserializer would answer UNKNOWN, naming the exception class,
    and log a traceback per call) and costs one throttled log line at most."""

    async def decode_then_handle(body: bytes, context: grpc.aio.ServicerContext) -> ResponseT:
        try:
            request = decode_request(message, body)
        except InvalidInputError as exc:
            undecodable.event(
                "refused undecodable request bodies, the latest %d bytes for %s from %s",
                len(body),
                message.DESCRIPTOR.name,
                context.peer(),
            )
            await _refuse(exc, context)
            raise  # unreachable: abort raises
        return await handler(request, context)

    return decode_then_handle


def _guarded(
    guard: CallerGuard, method: str, handler: Handler[bytes, ResponseT]
) -> Handler[bytes, ResponseT]:
    """``handler`` behind ``guard``: the caller is authenticated, authorized for ``method`` and
    counted against its quota before anything else (the body is not even decoded), and its
    quota released when the call ends."""

    async def guard_then_handle(body: bytes, context: grpc.aio.ServicerContext) -> ResponseT:
        try:
            quota = guard.admit(method, context)
        except CallerError as exc:
            await _refuse_caller(exc, context)
            raise  # unreachable: abort raises
        if quota is None:
            return await handler(body, context)
        try:
            return await handler(body, context)
        finally:
            quota.release()

    return guard_then_handle


_REFUSAL_REASON: Final[dict[grpc.StatusCode, str]] = {
    grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
    grpc.StatusCode.PERMISSION_DENIED: "permission_denied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "quota",
}
RETRY_AFTER_MS_KEY: Final = "retry-after-ms"
"""Trailing metadata of a call refused for its caller's quota: milliseconds until a retry may
pass (also in ``grpc-status-details-bin`` as a ``google.rpc.RetryInfo``)."""


async def _refuse_caller(exc: CallerError, context: grpc.aio.ServicerContext) -> None:
    """End the call with the status ``exc`` maps to; a quota refusal carries its retry hint."""
    code = grpc_status_for(exc)
    metrics.CALLERS_REFUSED.labels(_REFUSAL_REASON.get(code, "other")).inc()
    trailing: tuple[tuple[str, str | bytes], ...] = ()
    if isinstance(exc, QuotaExceededError):
        trailing = retry_trailers(str(exc), exc.retry_after_s)
    await context.abort(code, str(exc), trailing_metadata=trailing)


def retry_trailers(message: str, retry_after_s: float) -> tuple[tuple[str, str | bytes], ...]:
    """``retry-after-ms`` and the standard rich status (``google.rpc.Status`` with a
    ``RetryInfo``) for a RESOURCE_EXHAUSTED answer."""
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(max(1, int(retry_after_s * 1e9)))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message, details=[detail])
    return (
        (RETRY_AFTER_MS_KEY, str(max(1, math.ceil(retry_after_s * 1000)))),
        ("grpc-status-details-bin", status.SerializeToString()),
    )


def add_scoring_service(
    servicer: ScoringServicer, server: grpc.aio.Server, guard: CallerGuard | None = None
) -> None:
    """Register ``servicer`` on ``server`` as ``add_ScoringServiceServicer_to_server`` does, but
    with request bodies decoded by :func:`decode_request` (see :func:`_decoding`), and with
    every method behind ``guard`` when there is one (none: no per-call cost at all)."""
    undecodable = ThrottledLog(logger)
    behaviours: dict[str, Handler[bytes, object]] = {
        "Score": _decoding(scoring_pb2.ScoreRequest, servicer.Score, undecodable),
        "ScoreBatch": _decoding(scoring_pb2.ScoreBatchRequest, servicer.ScoreBatch, undecodable),
        "ReportOutcome": _decoding(
            scoring_pb2.ReportOutcomeRequest, servicer.ReportOutcome, undecodable
        ),
    }
    if guard is not None:
        behaviours = {name: _guarded(guard, name, b) for name, b in behaviours.items()}
    serializers = {
        "Score": scoring_pb2.ScoreResponse.SerializeToString,
        "ScoreBatch": scoring_pb2.ScoreBatchResponse.SerializeToString,
        "ReportOutcome": scoring_pb2.ReportOutcomeResponse.SerializeToString,
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(behaviour, response_serializer=serializers[name])
        for name, behaviour in behaviours.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def record_metrics(results: list[ScoreResult]) -> None:
    """Count each answer; observe the call's stage timings once (a batch shares them)."""
    for result in results:
        _answers(result.decided_by, result.decision).inc()
        for reason in result.reasons:
            _degraded(reason).inc()
    t = results[0].timings
    _STAGE_TOTAL.observe(t.total_us / 1e6)
    if t.redis_us:
        _STAGE_REDIS.observe(t.redis_us / 1e6)
    if t.stage1_us:
        _STAGE_1.observe(t.stage1_us / 1e6)
    if t.stage2_us:
        _STAGE_2.observe(t.stage2_us / 1e6)


# Metric children bound once: ``labels()`` takes a lock and builds a key on every call.
_STAGE_TOTAL: Final = metrics.STAGE_SECONDS.labels("total")
_STAGE_REDIS: Final = metrics.STAGE_SECONDS.labels("redis")
_STAGE_1: Final = metrics.STAGE_SECONDS.labels("stage1")
_STAGE_2: Final = metrics.STAGE_SECONDS.labels("stage2")


@functools.cache
def _answers(decided_by: DecidedBy, decision: Decision) -> Counter:
    return metrics.SCORES.labels(decided_by.value, decision.value)


@functools.cache
def _degraded(reason: Reason) -> Counter:
    return metrics.DEGRADED.labels(reason.value)


def _security_note(settings: Settings, guard: CallerGuard | None) -> str:
    tls = settings.server.tls
    parts = []
    if tls.enabled:
        parts.append("mutual TLS" if tls.client_ca_file is not None else "TLS")
    if guard is not None:
        parts.append("callers checked" if settings.auth.required else "callers metered")
    return f" with {', '.join(parts)}" if parts else ""


def model_versions(registry: Registry, policy_version: str) -> ModelVersions:
    """The versions named in responses and cache keys."""
    return ModelVersions(
        policy=policy_version,
        stage1=registry.stage1.version,
        stage2=registry.stage2.version,
        feature_set=registry.feature_set,
    )


class Orchestrator(AsyncResourceGroup):
    """The whole orchestrator process as one async context manager.

    ``port`` is the bound port (``settings.server.port`` 0 picks a free one).
    """

    def __init__(self, settings: Settings, *, tracer_provider: TracerProvider) -> None:
        self._settings = settings
        self._tracer = tracer_provider.get_tracer("cascade.orchestrator")
        registry = load_registry(settings.model_dir)
        if registry.feature_set != FEATURE_SET_VERSION:
            raise ConfigurationError(
                f"registry feature set {registry.feature_set!r} != code's {FEATURE_SET_VERSION!r}"
            )
        policy_path = settings.policy_file or settings.model_dir / registry.policy
        self._policy = load_policy(policy_path)
        self.versions = model_versions(registry, self._policy.version)
        self._registry = registry
        # Before anything starts: without a key no id could be kept (ConfigurationError).
        self.pseudonyms = from_settings(settings.pseudonym)
        """What stands in for card and device ids here (:mod:`cascade.pseudonym`)."""
        super().__init__()
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._warmup: asyncio.Task[None] | None = None
        self._readiness: asyncio.Task[None] | None = None
        self.serving = False
        """What health says (SERVING or not), as the readiness task last set it."""
        self.port = 0
        self.health_port: int | None = None
        """The bound plaintext health port (``server.health_port``; None without one)."""
        self.writer: PostAnswerWriter | None = None
        self.admission: Admission | None = None
        self.decisions: DecisionLog | None = None
        """The decision log (None when ``decision_log.enabled`` is off)."""
        self._store: RedisOnlineStore | RedisClusterOnlineStore | None = None
        self._servicer: ScoringServicer | None = None
        self._generation_stack = AsyncExitStack()
        self._retiring: list[AsyncExitStack] = []
        """Replaced generations' clients, left open while calls on them finish."""
        self._closing: set[asyncio.Task[None]] = set()
        """Generations' clients being closed, each in a task of its own (:meth:`_close_apart`)."""
        self._follow: asyncio.Task[None] | None = None
        self.certificates: ReloadingCertificates | None = None
        """The port's TLS files, re-read when they change (None without TLS)."""

    async def _start(self) -> None:
        s = self._settings
        store: RedisOnlineStore | RedisClusterOnlineStore
        if s.redis.cluster:
            store = await self._stack.enter_async_context(
                RedisClusterOnlineStore(
                    s.redis.urls,
                    cache_ttl_s=s.redis.cache_ttl_s,
                    feature_ttl_s=s.redis.feature_ttl_s,
                )
            )
        else:
            store = await self._stack.enter_async_context(
                RedisOnlineStore(
                    s.redis.url,
                    cache_ttl_s=s.redis.cache_ttl_s,
                    feature_ttl_s=s.redis.feature_ttl_s,
                    connections=s.redis.connections,
                    security=s.redis,
                )
            )
        self._store = store
        self.writer = await self._stack.enter_async_context(
            PostAnswerWriter(store, linger_s=s.redis.write_linger_ms / 1000.0)
        )
        if s.decision_log.enabled:
            # Entered before the server, so left after it: every answer of the drain is in the
            # buffer when the log flushes.
            sink = await self._stack.enter_async_context(
                JetStreamSink(s.decision_log.url or s.nats.url, s.decision_log, security=s.nats)
            )
            self.decisions = await self._stack.enter_async_context(
                DecisionLog(sink, s.decision_log, policy_version=self.versions.policy)
            )
        outcomes = None
        if s.outcomes.enabled:
            outcomes = await self._stack.enter_async_context(
                OutcomeStore(
                    s.outcomes.url or s.nats.url,
                    s.outcomes,
                    name="cascade-outcome-log",
                    security=s.nats,
                )
            )
        # The serving generation's clients live in a stack of their own (a registry change
        # replaces it); closed after the server stopped, before the writer drains.
        self._stack.push_async_callback(self._close_generation)
        generation = await open_generation(
            self._registry,
            s,
            store=store,
            writer=self.writer,
            tracer=self._tracer,
            stack=self._generation_stack,
            champion_policy=self._policy,
        )
        self.admission = Admission(s.admission)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", s.server.max_message_bytes),
                ("grpc.so_reuseport", int(s.server.reuse_port)),
            ]
        )
        self._servicer = ScoringServicer(
            generation, s, self._tracer, self.admission, self.pseudonyms, self.decisions, outcomes
        )
        guard = CallerGuard(s) if guard_needed(s) else None
        add_scoring_service(self._servicer, server, guard)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        enable_reflection((SERVICE_NAME, health.SERVICE_NAME), server)
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{s.server.host}:{s.server.port}"
        if s.server.tls.enabled:
            self.certificates = ReloadingCertificates(s.server.tls)
            self.port = server.add_secure_port(address, server_credentials(self.certificates))
        else:
            self.port = server.add_insecure_port(address)
        if self.port == 0:
            raise ConfigurationError(f"cannot bind {s.server.host}:{s.server.port}")
        await server.start()
        self._server = server
        if s.server.health_port is not None:
            await self._serve_health_port(s.server.host, s.server.health_port, s.server.reuse_port)
        # Unwound in reverse: tasks cancelled, then the server stopped (in-flight calls get the
        # grace), then the generation's clients closed, the writer drained, the store closed.
        self._stack.push_async_callback(server.stop, s.server.drain_s)
        self._warmup = asyncio.create_task(self._warm(store), name="orchestrator-warmup")
        self._stack.push_async_callback(cancel_and_wait, self._warmup)
        self._readiness = asyncio.create_task(
            self._follow_readiness(self._warmup), name="orchestrator-readiness"
        )
        self._stack.push_async_callback(cancel_and_wait, self._readiness)
        self._follow = asyncio.create_task(self._follow_registry(), name="orchestrator-registry")
        self._stack.push_async_callback(cancel_and_wait, self._follow)
        metrics.MODELS.info(
            {
                "role": "orchestrator",
                "policy": self.versions.policy,
                "stage1": self.versions.stage1,
                "stage2": self.versions.stage2,
                "feature_set": self.versions.feature_set,
            }
        )
        logger.info(
            "orchestrator listening on %s:%d%s (policy %s, stage1 %s, stage2 %s, features %s)",
            s.server.host,
            self.port,
            _security_note(s, guard),
            self.versions.policy,
            self.versions.stage1,
            self.versions.stage2,
            self.versions.feature_set,
        )
        if generation.candidate is not None:
            logger.info("canary: %s", describe(generation))

    @property
    def generation(self) -> Generation:
        """What serves now (champion lane, and the candidate's in a canary)."""
        assert self._servicer is not None, "not started"
        return self._servicer.generation

    async def _close_generation(self) -> None:
        """Close the serving generation's clients and every replaced one's still open (after the
        registry follower was cancelled, so nothing swaps them any more)."""
        stacks = [self._generation_stack, *self._retiring]
        self._generation_stack, self._retiring = AsyncExitStack(), []
        if self._closing:
            await asyncio.wait(set(self._closing))
        for stack in stacks:
            await stack.aclose()

    async def _close_apart(self, stack: AsyncExitStack) -> None:
        """Close ``stack`` in a task of its own and wait for it.

        The registry follower must not close clients itself: a shutdown cancels it again every
        ``_RECANCEL_S`` until it ends, and a cancellation landing inside ``nats.aio.Client.close``
        left the connection half closed, its socket open and its subscriptions' tasks pending (a
        clean-clone CI run's ResourceWarning). Cancelling the follower leaves this task to run on;
        the shutdown waits for it (:meth:`_close_generation`)."""
        task = asyncio.create_task(stack.aclose(), name="orchestrator-close-generation")
        self._closing.add(task)
        task.add_done_callback(self._closed)
        await asyncio.shield(task)

    def _closed(self, task: asyncio.Task[None]) -> None:
        self._closing.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("closing a generation's clients failed: %r", exc)

    async def _follow_registry(self) -> None:
        """Serve a changed ``registry.json`` without a restart.

        The new generation's clients are opened and must answer (its workers may still be
        loading the version) before one attribute write swaps it in; calls under way finish on
        the old one, whose clients close once they had time to. A registry that fails to load,
        or models that do not answer within ``rollout.switch_timeout_s``, leave the current
        generation serving (logged; the next change of the file is tried again)."""
        s = self._settings
        watch = RegistryWatch(s.model_dir)
        linger_s = (s.budget.slo_ms + s.budget.response_margin_ms) / 1000.0 + 1.0
        while True:
            await asyncio.sleep(s.rollout.reload_interval_s)
            if not watch.changed():
                continue
            try:
                registry = load_registry(s.model_dir)
            except ConfigurationError as exc:
                logger.error("registry changed but cannot be served, keeping the old: %s", exc)
                continue
            stack = AsyncExitStack()
            try:
                assert self._store is not None and self.writer is not None
                generation = await open_generation(
                    registry,
                    s,
                    store=self._store,
                    writer=self.writer,
                    tracer=self._tracer,
                    stack=stack,
                    champion_policy=load_policy(s.policy_file) if s.policy_file else None,
                )
                await lanes_answer(generation, s.rollout.switch_timeout_s)
            except (ConfigurationError, TimeoutError) as exc:
                await self._close_apart(stack)
                logger.error(
                    "registry changed but its models do not answer, keeping the old: %r", exc
                )
                continue
            except BaseException:
                await self._close_apart(stack)
                raise
            assert self._servicer is not None
            old_stack, self._generation_stack = self._generation_stack, stack
            self._servicer.generation = generation
            self.versions = generation.champion.versions
            self._registry = registry
            logger.info("registry changed: now serving %s", describe(generation))
            # Calls that picked the old lanes finish within the budget; then close them (at
            # shutdown, if that comes first).
            self._retiring.append(old_stack)
            await asyncio.sleep(linger_s)
            self._retiring.remove(old_stack)
            await self._close_apart(old_stack)

    async def _serve_health_port(self, host: str, port: int, reuse_port: bool) -> None:
        """A second, plaintext server with the health service alone (the one servicer, so the
        same status): probes that cannot do mutual TLS see health, and nothing else is there
        to reach without the main port's credentials (scoring answers UNIMPLEMENTED)."""
        probes = grpc.aio.server(options=[("grpc.so_reuseport", int(reuse_port))])
        health_pb2_grpc.add_HealthServicer_to_server(self._health, probes)
        self.health_port = probes.add_insecure_port(f"{host}:{port}")
        if self.health_port == 0:
            raise ConfigurationError(f"cannot bind the health port {host}:{port}")
        await probes.start()
        self._stack.push_async_callback(probes.stop, 0)

    async def _warm(self, store: RedisOnlineStore | RedisClusterOnlineStore) -> None:
        """Retry one stage-1 and one stage-2 request until both answer, run the whole scoring
        path a few times, then report SERVING.

        Redis is pinged once to open a pooled connection, but does not gate SERVING: without it
        the cascade still answers (labelled), while without the models it cannot.
        """
        try:
            await store.ping(timeout_s=1.0)
        except DependencyError as exc:
            logger.warning("Redis not reachable at start-up (%s); answers will be labelled", exc)
        generation = self.generation
        await lanes_answer(generation, None, _WARMUP_RETRY_S)
        # First calls through Python code paths (protobuf, features, pipelines) cost milliseconds;
        # pay them here. The synthetic card's history and cache entries expire with their TTLs.
        for lane in generation.lanes:
            for i in range(_WARMUP_PASSES):
                await lane.scorer.score(
                    self.pseudonyms.transaction(_warmup_transaction(i)),
                    Budget.start(None, self._settings.budget),
                )
        if self._settings.gc_freeze:
            freeze_heap()
        await self._set_serving(True)
        logger.info("models warm: health SERVING")

    async def _set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)  # ignored once a drain began
        self.serving = serving

    async def _follow_readiness(self, warmup: asyncio.Task[None]) -> None:
        """After warm-up: NOT_SERVING while the champion's stage 1 cannot be reached, SERVING
        again after."""
        await asyncio.shield(warmup)
        rows = np.zeros((1, N_SCREENING_FEATURES), dtype=np.float32)
        failed_rounds = 0
        while True:
            await asyncio.sleep(_READINESS_INTERVAL_S)
            screener = self.generation.champion.screener
            if await self._stage1_answers(screener, rows):
                failed_rounds = 0
                if not self.serving:
                    await self._set_serving(True)
                    logger.warning("stage 1 answers again: health SERVING")
                continue
            failed_rounds += 1
            if self.serving and failed_rounds >= _READINESS_FAILED_ROUNDS:
                await self._set_serving(False)
                logger.warning(
                    "stage 1 unreachable (%s): health NOT_SERVING, answers are the default",
                    "NATS disconnected" if not screener.connected else "no worker answers",
                )

    @staticmethod
    async def _stage1_answers(screener: NatsScreener, rows: npt.NDArray[np.float32]) -> bool:
        for _ in range(_READINESS_TRIES):
            if not screener.connected:
                return False
            try:
                await screener.screen(rows, timeout_s=_READINESS_PROBE_TIMEOUT_S)
            except DependencyError:
                continue
            return True
        return False

    async def wait_serving(self, timeout_s: float) -> None:
        """Wait until warm-up finished (raises TimeoutError after ``timeout_s``)."""
        if self._warmup is not None:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self._warmup)

    async def drain(self) -> None:
        """NOT_SERVING at once; keep accepting for ``shutdown_delay_s``; then stop taking calls and
        let in-flight ones finish within ``drain_s``."""
        await self._health.enter_graceful_shutdown()
        await asyncio.sleep(self._settings.server.shutdown_delay_s)
        if self._server is not None:
            await self._server.stop(grace=self._settings.server.drain_s)
