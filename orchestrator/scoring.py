"""The cascade for one transaction: cache and features, stage 1, routing, stage 2, fallback.

Every step gets at most what the budget leaves; every failure becomes a reason code on a
still-useful answer:

* Redis fails -> score without history (``CACHE_UNAVAILABLE``, ``FEATURES_UNAVAILABLE``) and
  route and decide by the policy's ``features_unavailable`` section: the normal thresholds were
  chosen for scores computed with history and let almost all fraud through without it
  (``docs/degraded_policy.md``).
* Stage 1 fails -> the configured conservative default, ``decided_by=DEFAULT``. We do not send the
  whole stream to stage 2 instead: that tier is sized for the escalated few percent, and flooding
  it would turn one outage into two.
* Stage 2 fails or is late -> stage 1's answer with ``STAGE2_TIMEOUT`` / ``_UNAVAILABLE`` /
  ``_OVERLOADED`` / ``_ERROR``.
* Too little time left for a step -> skip it, ``BUDGET_EXHAUSTED``; with under
  ``min_useful_ms`` at the start the default is answered at once.
* More escalations in flight than ``admission.stage2_max_in_flight`` -> stage 1's answer with
  ``STAGE2_OVERLOADED``, without asking.
* A dependency whose circuit breaker is open (:mod:`orchestrator.breaker`) is not asked: the
  answer is what its failure would have given, with the same reason code, at once.

Cache and history writes are queued for after the answer (:mod:`orchestrator.post_answer`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
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
    HistoryEntry,
    encode_history_entry,
    history_entry,
    insert_entry,
    screening_features,
    sequence_tensor,
    visible_history,
)
from cascade.model_registry import Policy
from cascade.settings import BreakerSettings, BudgetSettings
from cascade.telemetry import records_spans
from cascade.transaction import Transaction
from orchestrator.breaker import DependencyBreakers, DependencyGuard
from orchestrator.budget import Budget
from orchestrator.codec import decode_cached, encode_cached
from orchestrator.heavy_client import HeavyScorer
from orchestrator.online_store import (
    OnlineStore,
    StoreLookup,
    StoreWrite,
    card_history_key,
    decode_history,
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
    Decision.APPROVE: 0.0,
    Decision.REVIEW: 0.5,
    Decision.DECLINE: 1.0,
}


def _at(keys: list[str] | None, i: int) -> str:
    return keys[i] if keys is not None else ""


def _us_since(start_ns: int) -> int:
    return (time.perf_counter_ns() - start_ns) // 1000


@dataclass(slots=True)
class _Chunk:
    """What scoring one chunk of transactions produced."""

    results: list[ScoreResult]
    writes: list[StoreWrite]


class CascadeScorer:
    """Scores validated transactions within a budget; never raises for a dependency."""

    def __init__(
        self,
        *,
        store: OnlineStore,
        screener: Screener,
        heavy: HeavyScorer,
        policy: Policy,
        versions: ModelVersions,
        budget: BudgetSettings,
        default_decision: Decision,
        writer: PostAnswerWriter,
        tracer: trace.Tracer,
        chunk_items: int = 16,
        batch_stage2_items: int = 8,
        batch_share: float = 1.0,
        stage2_max_in_flight: int = 128,
        breakers: DependencyBreakers | None = None,
    ) -> None:
        self._store = store
        self._screener = screener
        self._heavy = heavy
        self._policy = policy
        self._degraded_policy = policy.when_features_unavailable()
        self._versions = versions
        self._budget = budget
        self._default_decision = default_decision
        self._default_score = _DEFAULT_SCORES[default_decision]
        self._writer = writer
        self._tracer = tracer
        self._spans = records_spans(tracer)
        self._chunk_items = chunk_items
        self._batch_stage2_items = batch_stage2_items
        self._batch_pause_ratio = (1.0 - batch_share) / batch_share
        self._stage2_max_in_flight = stage2_max_in_flight
        self.stage2_in_flight = 0
        self.breakers = breakers or DependencyBreakers(BreakerSettings(enabled=False))
        self._redis_guard = DependencyGuard(self.breakers.redis, "Redis (cache and features)")
        self._stage1_guard = DependencyGuard(self.breakers.stage1, "stage 1 (screening over NATS)")
        self._stage2_guard = DependencyGuard(self.breakers.stage2, "stage 2 (Triton)")

    @property
    def versions(self) -> ModelVersions:
        """The versions this scorer answers with."""
        return self._versions

    async def score(self, tx: Transaction, budget: Budget) -> ScoreResult:
        """The cascade's answer for ``tx``, inside ``budget``, with timings of its own."""
        start_ns = time.perf_counter_ns()
        timings = Timings.of(budget)
        chunk = await self._score_chunk([tx], budget, timings, {})
        for write in chunk.writes:
            self._writer.submit(write)
        (result,) = chunk.results
        timings.total_us = _us_since(start_ns)
        result.timings = timings
        return result

    async def score_many(
        self,
        txs: Sequence[Transaction],
        budget: Budget,
        defer: Callable[[float, float], Awaitable[None]] | None = None,
    ) -> list[ScoreResult]:
        """Answers for ``txs`` in order, inside one ``budget``.

        The batch is scored in chunks of ``chunk_items`` (one Redis round trip, one stage-1
        request and at most one stage-2 request each), one after the other, so a large batch
        never holds a worker, Redis or the event loop long enough to make a concurrent Score
        call late; each chunk's stage caps grow with its size, within the batch's budget.
        Transactions of one card see the earlier ones of the batch in their history, and the
        batch's history writes are queued only once every chunk has been looked up, so a batch
        scores exactly as the same transactions sent one by one would. The timings are the
        batch's (summed over chunks), shared by every result.

        ``defer(pause_s, window_s)``, when given, is awaited between chunks: it pauses for
        ``pause_s`` when live calls were about during the last chunk (``window_s``), so the batch
        works at most ``batch_share`` of the time beside them, while its budget allows.
        """
        start_ns = time.perf_counter_ns()
        timings = Timings.of(budget)
        earlier: dict[str, list[HistoryEntry]] = {}
        results: list[ScoreResult] = []
        writes: list[StoreWrite] = []
        chunks = range(0, len(txs), self._chunk_items)
        worked_s = last_chunk_s = 0.0  # in chunks, not pausing
        for done, start in enumerate(chunks):
            if done and defer is not None:
                # Live calls first, for batch_share of the time, and only while the chunks left,
                # at this pace, fit the budget.
                per_chunk_s = worked_s / done
                slack_s = budget.remaining_ms() / 1000.0 - (len(chunks) - done) * per_chunk_s * 1.5
                await defer(min(last_chunk_s * self._batch_pause_ratio, slack_s), last_chunk_s)
            chunk_start_ns = time.perf_counter_ns()
            chunk = await self._score_chunk(
                txs[start : start + self._chunk_items],
                budget,
                timings,
                earlier,
                self._batch_stage2_items,
                stage1_attempts=2,
            )
            last_chunk_s = (time.perf_counter_ns() - chunk_start_ns) / 1e9
            worked_s += last_chunk_s
            results += chunk.results
            writes += chunk.writes
        for write in writes:
            self._writer.submit(write)
        timings.total_us = _us_since(start_ns)
        for result in results:
            result.timings = timings
        return results

    def _cap_ms(self, base_ms: float, n: int) -> float:
        return base_ms + (n - 1) * self._budget.batch_item_ms

    async def _lookup(
        self, keys: list[tuple[str, str]], previous: list[str] | None, budget: Budget
    ) -> list[StoreLookup] | None:
        if not self._redis_guard.allow():
            self._skipped()
            return None
        timeout_s, grace_s = budget.capped_s(self._cap_ms(self._budget.redis_ms, len(keys)))
        try:
            if not self._spans:
                lookups = await self._store.lookup(keys, timeout_s, previous, grace_s)
            else:
                with self._tracer.start_as_current_span("redis.lookup", kind=trace.SpanKind.CLIENT):
                    lookups = await self._store.lookup(keys, timeout_s, previous, grace_s)
        except BaseException as exc:
            self._redis_guard.raised(exc)
            if isinstance(exc, DependencyError):
                return None
            raise
        self._redis_guard.answered()
        return lookups

    def _skipped(self) -> None:
        """Note on the call's span which breakers kept a dependency from being asked."""
        if self._spans:
            trace.get_current_span().set_attributes(self.breakers.open_ones())

    async def _score_chunk(
        self,
        txs: Sequence[Transaction],
        budget: Budget,
        timings: Timings,
        earlier: dict[str, list[HistoryEntry]],
        stage2_items: int | None = None,
        stage1_attempts: int = 1,
    ) -> _Chunk:
        """Score ``txs`` with one lookup and one request per stage (stage 2 in requests of at
        most ``stage2_items`` sequences, one after the other, when given).

        ``stage1_attempts``: a ScoreBatch chunk whose stage-1 request timed out is sent once
        more while its budget has another cap's worth left. No live caller waits on a batch's
        chunk, so a worker that was slow for a moment must not turn a whole chunk into default
        answers. A single call is not retried: its budget holds no second cap and stage 2."""
        cfg = self._budget
        n = len(txs)
        if budget.remaining_ms() < cfg.min_useful_ms:
            return _Chunk(
                [self.default_answer(tx.transaction_id, [Reason.BUDGET_EXHAUSTED]) for tx in txs],
                [],
            )

        reasons: list[Reason] = []
        keys = [
            (
                output_cache_key(tx, self._versions),
                card_history_key(tx.card_id, self._versions.feature_set),
            )
            for tx in txs
        ]
        # Only while a pseudonym key is rotated (cascade.pseudonym): the card's history under
        # its previous token, read when the current one has none and copied over with the write.
        previous = (
            [card_history_key(tx.previous_card_id, self._versions.feature_set) for tx in txs]
            if txs[0].previous_card_id
            else None
        )
        t0 = time.perf_counter_ns()
        lookups = await self._lookup(keys, previous, budget)
        policy = self._policy
        if lookups is None:
            reasons += [Reason.CACHE_UNAVAILABLE, Reason.FEATURES_UNAVAILABLE]
            policy = self._degraded_policy
        timings.redis_us += _us_since(t0)

        results: list[ScoreResult | None] = [None] * n
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
            return _Chunk([r for r in results if r is not None], [])

        t0 = time.perf_counter_ns()
        new_entries = [history_entry(txs[i]) for i in todo]
        histories = self._histories(txs, todo, lookups, new_entries, earlier)
        rows = np.stack(
            [screening_features(txs[i], h) for i, h in zip(todo, histories, strict=True)]
        )
        timings.features_us += _us_since(t0)
        entries = [encode_history_entry(e) for e in new_entries]
        writes: list[StoreWrite] = []

        stage1_scores: list[float] | None = None
        if budget.remaining_ms() < cfg.min_useful_ms:
            stage1_reason = Reason.BUDGET_EXHAUSTED
        elif not self._stage1_guard.allow():
            self._skipped()
            stage1_reason = Reason.STAGE1_UNAVAILABLE
        else:
            t0 = time.perf_counter_ns()
            cap_ms = self._cap_ms(cfg.stage1_ms, len(todo))
            for attempt in range(1, stage1_attempts + 1):
                try:
                    timeout_s, grace_s = budget.capped_s(cap_ms)
                    scores = await self._screener.screen(rows, timeout_s, grace_s)
                    stage1_scores = scores.tolist()
                    self._stage1_guard.answered()
                    break
                except BaseException as exc:
                    self._stage1_guard.raised(exc)
                    if not isinstance(exc, DependencyError):
                        raise
                    stage1_reason = _STAGE1_REASONS.get(type(exc), Reason.STAGE1_ERROR)
                    if (
                        attempt == stage1_attempts
                        or not isinstance(exc, DependencyTimeout)
                        or budget.remaining_ms() < cap_ms
                        or not self._stage1_guard.allow()
                    ):
                        break
            timings.stage1_us += _us_since(t0)
        if stage1_scores is None:
            for j, i in enumerate(todo):
                result = self.default_answer(txs[i].transaction_id, [*reasons, stage1_reason])
                result.features = rows[j]
                results[i] = result
                writes.append(
                    StoreWrite(keys[i][1], entries[j], previous_history_key=_at(previous, i))
                )
            return _Chunk([r for r in results if r is not None], writes)

        final = list(stage1_scores)
        batch_reasons = [list(reasons) for _ in todo]
        escalate: list[int] = []  # positions in todo
        for j, score in enumerate(stage1_scores):
            step = route(score, policy, budget.remaining_ms(), cfg.stage2_min_ms)
            if step is Route.ESCALATE:
                escalate.append(j)
            elif step is Route.NO_TIME:
                batch_reasons[j].append(Reason.BUDGET_EXHAUSTED)
        stage2_failed: dict[int, Reason] = {}  # position in todo -> why stage 2 did not answer
        if escalate:
            t0 = time.perf_counter_ns()
            per_request = stage2_items or len(escalate)
            for k in range(0, len(escalate), per_request):
                part = escalate[k : k + per_request]
                reason = await self._stage2(txs, todo, histories, part, final, budget)
                if reason is not None:
                    for j in escalate[k:]:  # what failed once is not asked again in this call
                        stage2_failed[j] = reason
                        batch_reasons[j].append(reason)
                    break
            timings.stage2_us += _us_since(t0)

        escalated = set(escalate)
        for j, i in enumerate(todo):
            result = ScoreResult(
                transaction_id=txs[i].transaction_id,
                decision=decide(final[j], policy),
                score=final[j],
                decided_by=(
                    DecidedBy.STAGE2
                    if j in escalated and j not in stage2_failed
                    else DecidedBy.STAGE1
                ),
                reasons=batch_reasons[j],
                stage1_score=stage1_scores[j],
                escalated=j in escalated,
                features=rows[j],
            )
            results[i] = result
            # A degraded answer is never cached: after the outage the full cascade should answer.
            cache_value = None if result.degraded else encode_cached(result)
            writes.append(
                StoreWrite(keys[i][1], entries[j], keys[i][0], cache_value, _at(previous, i))
            )
        return _Chunk([r for r in results if r is not None], writes)

    async def _stage2(
        self,
        txs: Sequence[Transaction],
        todo: list[int],
        histories: list[Sequence[HistoryEntry]],
        escalate: list[int],
        final: list[float],
        budget: Budget,
    ) -> Reason | None:
        """Ask stage 2 about ``escalate`` (positions in ``todo``), writing its scores into
        ``final``; the reason it could not answer, or None."""
        n = len(escalate)
        # A request larger than the whole limit still goes when nothing else is in flight.
        if self.stage2_in_flight and self.stage2_in_flight + n > self._stage2_max_in_flight:
            return Reason.STAGE2_OVERLOADED
        if not self._stage2_guard.allow():
            self._skipped()
            return Reason.STAGE2_UNAVAILABLE
        self.stage2_in_flight += n
        try:
            sequences = np.stack([sequence_tensor(txs[todo[j]], histories[j]) for j in escalate])
            timeout_s = budget.allot_s(float("inf"), keep_ms=self._budget.stage2_margin_ms)
            heavy_scores = await self._heavy.score(sequences, timeout_s)
        except BaseException as exc:
            self._stage2_guard.raised(exc)
            if not isinstance(exc, DependencyError):
                raise
            return _STAGE2_REASONS.get(type(exc), Reason.STAGE2_ERROR)
        finally:
            self.stage2_in_flight -= n
        self._stage2_guard.answered()
        for j, score in zip(escalate, heavy_scores.tolist(), strict=True):
            final[j] = score
        return None

    @staticmethod
    def _histories(
        txs: Sequence[Transaction],
        todo: list[int],
        lookups: list[StoreLookup] | None,
        new_entries: list[HistoryEntry],
        earlier: dict[str, list[HistoryEntry]],
    ) -> list[Sequence[HistoryEntry]]:
        """What each transaction's features read of its card's history: the stored entries with
        the earlier same-card transactions of this batch (``earlier``, in batch order, updated
        here) added by the store's own rule (:func:`~cascade.features.insert_entry`), then
        :func:`~cascade.features.visible_history` (nothing newer than the transaction, not the
        transaction itself). That is what the store would hold had they been sent one by one."""
        histories: list[Sequence[HistoryEntry]] = []
        for i, entry in zip(todo, new_entries, strict=True):
            tx = txs[i]
            stored = decode_history(lookups[i].history) if lookups is not None else []
            for previous in earlier.get(tx.card_id, ()):
                insert_entry(stored, previous)
            histories.append(visible_history(tx, stored))
            earlier.setdefault(tx.card_id, []).append(entry)
        return histories

    def default_answer(self, transaction_id: str, reasons: list[Reason]) -> ScoreResult:
        """The configured conservative answer, ``decided_by=DEFAULT``, labelled with ``reasons``."""
        return ScoreResult(
            transaction_id=transaction_id,
            decision=self._default_decision,
            score=self._default_score,
            decided_by=DecidedBy.DEFAULT,
            reasons=reasons,
        )
