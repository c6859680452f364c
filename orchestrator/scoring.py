"""The cascade for one transaction: cache and features, stage 1, routing, stage 2, fallback.

Every step gets at most what the budget leaves; every failure becomes a reason code on a
still-useful answer:

* Redis fails -> score without history (``CACHE_UNAVAILABLE``, ``FEATURES_UNAVAILABLE``).
* Stage 1 fails -> the configured conservative default, ``decided_by=DEFAULT``. We do not send the
  whole stream to stage 2 instead: that tier is sized for the escalated few percent, and flooding
  it would turn one outage into two.
* Stage 2 fails or is late -> stage 1's answer with ``STAGE2_TIMEOUT`` / ``_UNAVAILABLE`` /
  ``_OVERLOADED`` / ``_ERROR``.
* Too little time left for a step -> skip it, ``BUDGET_EXHAUSTED``; with under
  ``min_useful_ms`` at the start the default is answered at once.

Cache and history writes are queued for after the answer (:mod:`orchestrator.post_answer`).
"""

from __future__ import annotations

import logging
import time
from typing import Final

from opentelemetry import trace

from cascade.errors import (
    DependencyError,
    DependencyOverloaded,
    DependencyTimeout,
    DependencyUnavailable,
)
from cascade.features import (
    encode_history_entry,
    history_entry,
    screening_features,
    sequence_tensor,
)
from cascade.model_registry import Policy
from cascade.settings import BudgetSettings, DefaultDecision
from cascade.transaction import Transaction
from orchestrator.budget import Budget
from orchestrator.codec import decode_cached, encode_cached
from orchestrator.heavy_client import HeavyScorer
from orchestrator.online_store import (
    OnlineStore,
    StoreWrite,
    card_history_key,
    output_cache_key,
)
from orchestrator.post_answer import PostAnswerWriter
from orchestrator.results import DecidedBy, ModelVersions, Reason, ScoreResult, Timings
from orchestrator.routing import Decision, Route, decide, route
from orchestrator.screening_client import Screener

logger = logging.getLogger(__name__)

_STAGE1_REASONS: Final = {
    DependencyTimeout: Reason.STAGE1_TIMEOUT,
    DependencyUnavailable: Reason.STAGE1_UNAVAILABLE,
    DependencyOverloaded: Reason.STAGE1_UNAVAILABLE,
}
_STAGE2_REASONS: Final = {
    DependencyTimeout: Reason.STAGE2_TIMEOUT,
    DependencyUnavailable: Reason.STAGE2_UNAVAILABLE,
    DependencyOverloaded: Reason.STAGE2_OVERLOADED,
}
# Scores that stand for each default decision, so a DEFAULT answer still carries a usable score.
_DEFAULT_SCORES: Final = {
    DefaultDecision.APPROVE: 0.0,
    DefaultDecision.REVIEW: 0.5,
    DefaultDecision.DECLINE: 1.0,
}


def _us_since(start_ns: int) -> int:
    return (time.perf_counter_ns() - start_ns) // 1000


class CascadeScorer:
    """Scores one validated transaction within a budget; never raises for a dependency."""

    def __init__(
        self,
        *,
        store: OnlineStore,
        screener: Screener,
        heavy: HeavyScorer,
        policy: Policy,
        versions: ModelVersions,
        budget: BudgetSettings,
        default_decision: DefaultDecision,
        writer: PostAnswerWriter,
        tracer: trace.Tracer,
    ) -> None:
        self._store = store
        self._screener = screener
        self._heavy = heavy
        self._policy = policy
        self._versions = versions
        self._budget = budget
        self._default_decision = Decision(default_decision.value)
        self._default_score = _DEFAULT_SCORES[default_decision]
        self._writer = writer
        self._tracer = tracer

    @property
    def versions(self) -> ModelVersions:
        """The versions this scorer answers with."""
        return self._versions

    async def score(self, tx: Transaction, budget: Budget) -> ScoreResult:
        """The cascade's answer for ``tx``, inside ``budget``."""
        start_ns = time.perf_counter_ns()
        timings = Timings(budget_us=int(budget.total_ms * 1000))
        result = await self._score(tx, budget, timings)
        timings.total_us = _us_since(start_ns)
        result.timings = timings
        return result

    async def _score(self, tx: Transaction, budget: Budget, timings: Timings) -> ScoreResult:
        cfg = self._budget
        if budget.remaining_ms() < cfg.min_useful_ms:
            return self._default(tx, [Reason.BUDGET_EXHAUSTED])

        reasons: list[Reason] = []
        cache_key = output_cache_key(tx, self._versions)
        history_key = card_history_key(tx.card_id, self._versions.feature_set)
        t0 = time.perf_counter_ns()
        try:
            with self._tracer.start_as_current_span("redis.lookup", kind=trace.SpanKind.CLIENT):
                lookup = await self._store.lookup(
                    cache_key, history_key, budget.allot_s(cfg.redis_ms)
                )
        except DependencyError as exc:
            logger.debug("online store lookup failed: %s", exc)
            lookup = None
            reasons += [Reason.CACHE_UNAVAILABLE, Reason.FEATURES_UNAVAILABLE]
        timings.redis_us = _us_since(t0)

        if lookup is not None and lookup.cached is not None:
            try:
                return decode_cached(lookup.cached, tx.transaction_id)
            except ValueError:
                logger.warning("ignoring an unreadable output-cache entry")
        history = lookup.history if lookup is not None else []

        t0 = time.perf_counter_ns()
        rows = screening_features(tx, history)[None, :]
        timings.features_us = _us_since(t0)
        new_history = StoreWrite(history_key, encode_history_entry(history_entry(tx)))

        if budget.remaining_ms() < cfg.min_useful_ms:
            self._writer.submit(new_history)
            return self._default(tx, [*reasons, Reason.BUDGET_EXHAUSTED])
        t0 = time.perf_counter_ns()
        try:
            stage1_score = float(
                (await self._screener.screen(rows, budget.allot_s(cfg.stage1_ms)))[0]
            )
        except DependencyError as exc:
            timings.stage1_us = _us_since(t0)
            self._writer.submit(new_history)
            return self._default(
                tx, [*reasons, _STAGE1_REASONS.get(type(exc), Reason.STAGE1_ERROR)]
            )
        timings.stage1_us = _us_since(t0)

        score, decided_by, escalated = stage1_score, DecidedBy.STAGE1, False
        next_step = route(stage1_score, self._policy, budget.remaining_ms(), cfg.stage2_min_ms)
        if next_step is Route.NO_TIME:
            reasons.append(Reason.BUDGET_EXHAUSTED)
        elif next_step is Route.ESCALATE:
            escalated = True
            t0 = time.perf_counter_ns()
            try:
                sequences = sequence_tensor(tx, history)[None, ...]
                timeout_s = budget.allot_s(float("inf"), keep_ms=cfg.stage2_margin_ms)
                score = float((await self._heavy.score(sequences, timeout_s))[0])
                decided_by = DecidedBy.STAGE2
            except DependencyError as exc:
                logger.debug("stage 2 failed: %s", exc)
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
        # A degraded answer is never cached: once the outage ends, the full cascade should answer.
        cache_value = None if result.degraded else encode_cached(result)
        self._writer.submit(
            StoreWrite(history_key, new_history.history_entry, cache_key, cache_value)
        )
        return result

    def _default(self, tx: Transaction, reasons: list[Reason]) -> ScoreResult:
        return ScoreResult(
            transaction_id=tx.transaction_id,
            decision=self._default_decision,
            score=self._default_score,
            decided_by=DecidedBy.DEFAULT,
            reasons=reasons,
        )
