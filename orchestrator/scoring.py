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
from collections.abc import Sequence
from typing import Final

import numpy as np
from opentelemetry import trace

from cascade.errors import (
    DependencyError,
    DependencyOverloaded,
    DependencyTimeout,
    DependencyUnavailable,
)
from cascade.features import (
    HISTORY_LEN,
    HistoryEntry,
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
    StoreLookup,
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
        (result,) = await self.score_many((tx,), budget)
        return result

    async def score_many(self, txs: Sequence[Transaction], budget: Budget) -> list[ScoreResult]:
        """Answers for ``txs`` in order, inside one ``budget``.

        One Redis round trip, one stage-1 request and at most one stage-2 request serve the whole
        batch. Transactions of one card see the earlier ones of the batch in their history, so
        a batch scores exactly as the same transactions sent one by one would. The timings are
        the batch's, shared by every result.
        """
        start_ns = time.perf_counter_ns()
        timings = Timings(budget_us=int(budget.total_ms * 1000))
        results = await self._score_many(txs, budget, timings)
        timings.total_us = _us_since(start_ns)
        for result in results:
            result.timings = timings
        return results

    async def _score_many(
        self, txs: Sequence[Transaction], budget: Budget, timings: Timings
    ) -> list[ScoreResult]:
        cfg = self._budget
        if budget.remaining_ms() < cfg.min_useful_ms:
            return [self.default_answer(tx, [Reason.BUDGET_EXHAUSTED]) for tx in txs]

        reasons: list[Reason] = []
        keys = [
            (
                output_cache_key(tx, self._versions),
                card_history_key(tx.card_id, self._versions.feature_set),
            )
            for tx in txs
        ]
        t0 = time.perf_counter_ns()
        try:
            with self._tracer.start_as_current_span("redis.lookup", kind=trace.SpanKind.CLIENT):
                lookups: list[StoreLookup] | None = await self._store.lookup(
                    keys, budget.allot_s(cfg.redis_ms)
                )
        except DependencyError as exc:
            logger.debug("online store lookup failed: %s", exc)
            lookups = None
            reasons += [Reason.CACHE_UNAVAILABLE, Reason.FEATURES_UNAVAILABLE]
        timings.redis_us = _us_since(t0)

        results: list[ScoreResult | None] = [None] * len(txs)
        todo: list[int] = []
        for i, tx in enumerate(txs):
            cached = lookups[i].cached if lookups is not None else None
            if cached is not None:
                try:
                    results[i] = decode_cached(cached, tx.transaction_id)
                    continue
                except ValueError:
                    logger.warning("ignoring an unreadable output-cache entry")
            todo.append(i)
        if not todo:
            return [r for r in results if r is not None]

        t0 = time.perf_counter_ns()
        new_entries = [history_entry(txs[i]) for i in todo]
        histories = self._histories(txs, todo, lookups, new_entries)
        rows = np.stack(
            [screening_features(txs[i], h) for i, h in zip(todo, histories, strict=True)]
        )
        timings.features_us = _us_since(t0)
        entries = [encode_history_entry(e) for e in new_entries]

        stage1_scores: list[float] | None = None
        if budget.remaining_ms() < cfg.min_useful_ms:
            stage1_reason = Reason.BUDGET_EXHAUSTED
        else:
            t0 = time.perf_counter_ns()
            try:
                scores = await self._screener.screen(rows, budget.allot_s(cfg.stage1_ms))
                stage1_scores = [float(x) for x in scores]
            except DependencyError as exc:
                stage1_reason = _STAGE1_REASONS.get(type(exc), Reason.STAGE1_ERROR)
            timings.stage1_us = _us_since(t0)
        if stage1_scores is None:
            for j, i in enumerate(todo):
                results[i] = self.default_answer(txs[i], [*reasons, stage1_reason])
                self._writer.submit(StoreWrite(keys[i][1], entries[j]))
            return [r for r in results if r is not None]

        final = list(stage1_scores)
        batch_reasons = [list(reasons) for _ in todo]
        escalate: list[int] = []  # positions in todo
        for j, score in enumerate(stage1_scores):
            step = route(score, self._policy, budget.remaining_ms(), cfg.stage2_min_ms)
            if step is Route.ESCALATE:
                escalate.append(j)
            elif step is Route.NO_TIME:
                batch_reasons[j].append(Reason.BUDGET_EXHAUSTED)
        answered_by_stage2 = False
        if escalate:
            t0 = time.perf_counter_ns()
            try:
                sequences = np.stack(
                    [sequence_tensor(txs[todo[j]], histories[j]) for j in escalate]
                )
                timeout_s = budget.allot_s(float("inf"), keep_ms=cfg.stage2_margin_ms)
                heavy_scores = await self._heavy.score(sequences, timeout_s)
                for j, score in zip(escalate, heavy_scores, strict=True):
                    final[j] = float(score)
                answered_by_stage2 = True
            except DependencyError as exc:
                logger.debug("stage 2 failed: %s", exc)
                stage2_reason = _STAGE2_REASONS.get(type(exc), Reason.STAGE2_ERROR)
                for j in escalate:
                    batch_reasons[j].append(stage2_reason)
            timings.stage2_us = _us_since(t0)

        escalated = set(escalate)
        for j, i in enumerate(todo):
            result = ScoreResult(
                transaction_id=txs[i].transaction_id,
                decision=decide(final[j], self._policy),
                score=final[j],
                decided_by=(
                    DecidedBy.STAGE2 if answered_by_stage2 and j in escalated else DecidedBy.STAGE1
                ),
                reasons=batch_reasons[j],
                stage1_score=stage1_scores[j],
                escalated=j in escalated,
            )
            results[i] = result
            # A degraded answer is never cached: after the outage the full cascade should answer.
            cache_value = None if result.degraded else encode_cached(result)
            self._writer.submit(StoreWrite(keys[i][1], entries[j], keys[i][0], cache_value))
        return [r for r in results if r is not None]

    @staticmethod
    def _histories(
        txs: Sequence[Transaction],
        todo: list[int],
        lookups: list[StoreLookup] | None,
        new_entries: list[HistoryEntry],
    ) -> list[list[HistoryEntry]]:
        """Each transaction's history, newest first, with earlier same-card transactions of this
        batch in front (what the store would hold had they been sent one by one)."""
        earlier: dict[str, list[HistoryEntry]] = {}
        histories: list[list[HistoryEntry]] = []
        for i, entry in zip(todo, new_entries, strict=True):
            card_id = txs[i].card_id
            stored = lookups[i].history if lookups is not None else []
            in_batch = earlier.get(card_id)
            histories.append((in_batch + stored)[:HISTORY_LEN] if in_batch else stored)
            earlier.setdefault(card_id, []).insert(0, entry)
        return histories

    def default_answer(self, tx: Transaction, reasons: list[Reason]) -> ScoreResult:
        """The configured conservative answer, ``decided_by=DEFAULT``, labelled with ``reasons``."""
        return ScoreResult(
            transaction_id=tx.transaction_id,
            decision=self._default_decision,
            score=self._default_score,
            decided_by=DecidedBy.DEFAULT,
            reasons=reasons,
        )
