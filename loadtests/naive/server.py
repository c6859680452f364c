"""The naive baseline's scoring server: the same cascade, every hop awaited one after another.

See :mod:`loadtests.naive` for what is naive about it. :class:`NaiveServer` is the async context
manager that opens the clients and the grpc.aio server and closes them in reverse order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Final, TypeVar

import grpc
import nats
import numpy as np
import numpy.typing as npt
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from nats.aio.client import Client as NatsClient
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc.aio import InferenceServerClient

from cascade.errors import (
    Dependency,
    DependencyError,
    DependencyFailed,
    DependencyOverloaded,
    DependencyTimeout,
    DependencyUnavailable,
    InvalidInputError,
    grpc_status_for,
    translate_nats_errors,
    translate_redis_errors,
    translate_triton_errors,
)
from cascade.features import (
    HISTORY_LEN,
    encode_history_entry,
    history_entry,
    screening_features,
    sequence_tensor,
)
from cascade.lifecycle import AsyncResourceGroup
from cascade.model_registry import Policy, Registry, load_policy, load_registry
from cascade.screening_protocol import screening_subject
from cascade.settings import Settings
from cascade.transaction import Transaction
from cascade.v1 import scoring_pb2, scoring_pb2_grpc
from loadtests.naive.protocol import decode_cached, encode_cached, encode_request, parse_reply
from orchestrator.budget import Budget
from orchestrator.codec import result_to_proto, versions_to_proto
from orchestrator.online_store import card_history_key, decode_history, output_cache_key
from orchestrator.results import DecidedBy, ModelVersions, Reason, ScoreResult, Timings
from orchestrator.routing import Decision, Route, decide, route
from orchestrator.server import SERVICE_NAME, model_versions
from orchestrator.validation import validate_request

__all__ = ["NaiveServer", "NaiveServicer"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

KEY_PREFIX: Final = "naive:"
_DEFAULT_SCORE: Final = 0.5
_STAGE1_REASONS: Final = {
    DependencyTimeout: Reason.STAGE1_TIMEOUT,
    DependencyUnavailable: Reason.STAGE1_UNAVAILABLE,
}
_STAGE2_REASONS: Final = {
    DependencyTimeout: Reason.STAGE2_TIMEOUT,
    DependencyUnavailable: Reason.STAGE2_UNAVAILABLE,
    DependencyOverloaded: Reason.STAGE2_OVERLOADED,
}


def _us_since(start_ns: int) -> int:
    return (time.perf_counter_ns() - start_ns) // 1000


class NaiveServicer(scoring_pb2_grpc.ScoringServiceServicer):
    """``Score`` done the straightforward way (see the package docstring)."""

    def __init__(
        self,
        *,
        settings: Settings,
        registry: Registry,
        policy: Policy,
        redis: aioredis.Redis,
        nc: NatsClient,
        triton: InferenceServerClient,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._policy = policy
        self._versions: ModelVersions = model_versions(registry, policy.version)
        self._versions_pb = versions_to_proto(self._versions)
        self._redis = redis
        self._nc = nc
        self._triton = triton
        self._subject = screening_subject(settings.nats.subject_prefix, registry.stage1.version)

    async def Score(
        self, request: scoring_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> scoring_pb2.ScoreResponse:
        """Validate, then run every step in turn and write the cache before answering."""
        budget = Budget.start(context.time_remaining(), self._settings.budget)
        try:
            tx = validate_request(request)
        except InvalidInputError as exc:
            await context.abort(grpc_status_for(exc), str(exc))
        start_ns = time.perf_counter_ns()
        timings = Timings.of(budget)
        result = await self._score(tx, budget, timings)
        timings.total_us = _us_since(start_ns)
        result.timings = timings
        return result_to_proto(result, self._versions_pb, "")

    async def ScoreBatch(
        self, request: scoring_pb2.ScoreBatchRequest, context: grpc.aio.ServicerContext
    ) -> scoring_pb2.ScoreBatchResponse:
        """Naively, one :meth:`Score` after another (the whole batch shares one budget)."""
        results = []
        for tx in request.transactions:
            one = scoring_pb2.ScoreRequest(transaction=tx)
            results.append(await self.Score(one, context))
        return scoring_pb2.ScoreBatchResponse(results=results)

    async def ReportOutcome(
        self, request: scoring_pb2.ReportOutcomeRequest, context: grpc.aio.ServicerContext
    ) -> scoring_pb2.ReportOutcomeResponse:
        """Not part of the latency baseline: labels are stored by the real orchestrator."""
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the naive baseline stores no labels")
        raise AssertionError("unreachable: abort raises")

    async def _score(self, tx: Transaction, budget: Budget, timings: Timings) -> ScoreResult:
        cache_key = KEY_PREFIX + output_cache_key(tx, self._versions)
        history_key = KEY_PREFIX + card_history_key(tx.card_id, self._versions.feature_set)
        reasons: list[Reason] = []
        raw_history: list[bytes] = []
        t0 = time.perf_counter_ns()
        try:
            cached = await self._redis_call(self._redis.get(cache_key), budget)
            if isinstance(cached, bytes):
                timings.redis_us = _us_since(t0)
                try:
                    return decode_cached(cached, tx.transaction_id)
                except ValueError:
                    logger.warning("ignoring an unreadable cache entry")
            raw = await self._redis_call(
                self._redis.lrange(history_key, 0, HISTORY_LEN - 1), budget
            )
            raw_history = [item for item in raw if isinstance(item, bytes)]
        except DependencyError:
            reasons += [Reason.CACHE_UNAVAILABLE, Reason.FEATURES_UNAVAILABLE]
        timings.redis_us = _us_since(t0)
        history = decode_history(raw_history)

        t0 = time.perf_counter_ns()
        rows = screening_features(tx, history)[None, :]
        timings.features_us = _us_since(t0)

        t0 = time.perf_counter_ns()
        try:
            stage1_score = await self._screen(rows, budget.allot_s(self._settings.budget.stage1_ms))
        except DependencyError as exc:
            timings.stage1_us = _us_since(t0)
            reasons.append(_STAGE1_REASONS.get(type(exc), Reason.STAGE1_ERROR))
            return ScoreResult(
                transaction_id=tx.transaction_id,
                decision=Decision(self._settings.default_decision.value),
                score=_DEFAULT_SCORE,
                decided_by=DecidedBy.DEFAULT,
                reasons=reasons,
            )
        timings.stage1_us = _us_since(t0)

        score, decided_by, escalated = stage1_score, DecidedBy.STAGE1, False
        cfg = self._settings.budget
        next_step = route(stage1_score, self._policy, budget.remaining_ms(), cfg.stage2_min_ms)
        if next_step is Route.NO_TIME:
            reasons.append(Reason.BUDGET_EXHAUSTED)
        elif next_step is Route.ESCALATE:
            escalated = True
            t0 = time.perf_counter_ns()
            try:
                sequences = sequence_tensor(tx, history)[None, ...]
                score = await self._heavy(
                    sequences, budget.allot_s(float("inf"), keep_ms=cfg.stage2_margin_ms)
                )
                decided_by = DecidedBy.STAGE2
            except DependencyError as exc:
                reasons.append(_STAGE2_REASONS.get(type(exc), Reason.STAGE2_ERROR))
            timings.stage2_us = _us_since(t0)

        result = ScoreResult(
            transaction_id=tx.transaction_id,
            decision=decide(score, self._policy),
            score=score,
            decided_by=decided_by,
            reasons=reasons,
            stage1_score=stage1_score,
            escalated=escalated,
        )
        t0 = time.perf_counter_ns()
        await self._write(tx, cache_key, history_key, result, budget)
        timings.redis_us += _us_since(t0)
        return result

    async def _redis_call(self, call: Awaitable[T], budget: Budget) -> T:
        with translate_redis_errors():
            async with asyncio.timeout(budget.allot_s(self._settings.budget.redis_ms)):
                return await call

    async def _write(
        self,
        tx: Transaction,
        cache_key: str,
        history_key: str,
        result: ScoreResult,
        budget: Budget,
    ) -> None:
        """Cache the answer and append the history entry: four round trips, in turn."""
        r = self._redis
        ttl = self._settings.redis
        try:
            if not result.degraded:
                await self._redis_call(
                    r.set(cache_key, encode_cached(result), ex=ttl.cache_ttl_s), budget
                )
            entry = encode_history_entry(history_entry(tx))
            await self._redis_call(r.lpush(history_key, entry), budget)
            await self._redis_call(r.ltrim(history_key, 0, HISTORY_LEN - 1), budget)
            await self._redis_call(r.expire(history_key, ttl.feature_ttl_s), budget)
        except DependencyError as exc:
            logger.debug("naive write failed: %s", exc)

    async def _screen(self, rows: npt.NDArray[np.float32], timeout_s: float) -> float:
        payload = encode_request(rows, self._registry.stage1.version, self._registry.feature_set)
        with translate_nats_errors():
            msg = await self._nc.request(self._subject, payload, timeout=timeout_s)
        try:
            reply = parse_reply(msg.data)
        except ValueError as exc:
            raise DependencyFailed(Dependency.SCREENING, str(exc)) from exc
        if reply.error or reply.scores.shape[0] != 1:
            raise DependencyFailed(Dependency.SCREENING, reply.error or "no score")
        return float(reply.scores[0])

    async def _heavy(self, sequences: npt.NDArray[np.float32], timeout_s: float) -> float:
        if timeout_s <= 0:
            raise DependencyTimeout(Dependency.HEAVY, "no time left")
        infer_input = InferInput("sequence", list(sequences.shape), "FP32")
        infer_input.set_data_from_numpy(np.ascontiguousarray(sequences, dtype=np.float32))
        stage2 = self._registry.stage2
        with translate_triton_errors():
            result = await self._triton.infer(
                stage2.triton_model or "",
                [infer_input],
                model_version=str(stage2.triton_version),
                outputs=[InferRequestedOutput("score")],
                client_timeout=timeout_s,
            )
        scores = result.as_numpy("score")
        if scores is None or scores.size != 1:
            raise DependencyFailed(Dependency.HEAVY, "Triton returned no usable 'score' output")
        return float(scores.reshape(-1)[0])


class NaiveServer(AsyncResourceGroup):
    """The naive scoring server and its clients; an async context manager. ``port`` is bound."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self._settings = settings
        self._registry = load_registry(settings.model_dir)
        self._policy = load_policy(settings.policy_file or self._registry.policy_path)
        self.port = 0

    async def _start(self) -> None:
        s = self._settings
        redis = aioredis.Redis.from_url(s.redis.url, socket_timeout=1.0)
        self._stack.push_async_callback(redis.aclose)
        nc = await nats.connect(s.nats.url, name="naive-orchestrator")
        self._stack.push_async_callback(nc.close)
        triton = InferenceServerClient(s.triton.url)
        self._stack.push_async_callback(triton.close)
        server = grpc.aio.server()
        scoring_pb2_grpc.add_ScoringServiceServicer_to_server(
            NaiveServicer(
                settings=s,
                registry=self._registry,
                policy=self._policy,
                redis=redis,
                nc=nc,
                triton=triton,
            ),
            server,
        )
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.port = server.add_insecure_port(f"{s.server.host}:{s.server.port}")
        await server.start()
        self._stack.push_async_callback(server.stop, 1.0)
        logger.info("naive scoring server listening on %s:%d", s.server.host, self.port)
