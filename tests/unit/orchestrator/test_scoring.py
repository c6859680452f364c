"""The cascade's routing, fallback and caching, on in-memory twins of Redis, NATS and Triton."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from opentelemetry.trace import NoOpTracer

from cascade.errors import (
    Dependency,
    DependencyFailed,
    DependencyOverloaded,
    DependencyTimeout,
    DependencyUnavailable,
)
from cascade.features import (
    SCREENING_FEATURE_NAMES,
    CardHistories,
    HistoryEntry,
    decode_history_entry,
    encode_history_entry,
    history_entry,
    screening_features,
)
from cascade.model_registry import FeaturesUnavailable, Policy, load_policy, load_registry
from cascade.settings import DEFAULT_MODEL_DIR, BudgetSettings
from orchestrator.breaker import DependencyBreakers
from orchestrator.budget import Budget
from orchestrator.heavy_client import InMemoryHeavyScorer
from orchestrator.online_store import InMemoryOnlineStore, StoreWrite, card_history_key
from orchestrator.post_answer import PostAnswerWriter
from orchestrator.results import DecidedBy, ModelVersions, Reason, ScoreResult
from orchestrator.routing import Decision, decide
from orchestrator.scoring import CascadeScorer
from orchestrator.screening_client import InMemoryScreener
from tests.conftest import make_transaction

POLICY = Policy(
    version="p-test",
    escalate_low=0.3,
    escalate_high=0.7,
    review_threshold=0.5,
    decline_threshold=0.8,
)
VERSIONS = ModelVersions(policy="p-test", stage1="s1-t", stage2="s2-t", feature_set="fs-1")
SETTINGS = BudgetSettings(slo_ms=50, response_margin_ms=2, stage1_ms=10, redis_ms=5)


ScoreFn = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]


def constant(value: float) -> ScoreFn:
    def score(rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return np.full(rows.shape[0], value, dtype=np.float32)

    return score


@dataclass
class Cascade:
    scorer: CascadeScorer
    store: InMemoryOnlineStore
    screener: InMemoryScreener
    heavy: InMemoryHeavyScorer
    writer: PostAnswerWriter


def make_scorer(
    store: InMemoryOnlineStore,
    screener: InMemoryScreener,
    heavy: InMemoryHeavyScorer,
    writer: PostAnswerWriter,
    **overrides: Any,
) -> CascadeScorer:
    """A scorer on the given twins with this module's policy, versions and budget."""
    settings: dict[str, Any] = {
        "policy": POLICY,
        "versions": VERSIONS,
        "budget": SETTINGS,
        "default_decision": Decision.REVIEW,
        "tracer": NoOpTracer(),
    }
    return CascadeScorer(
        store=store, screener=screener, heavy=heavy, writer=writer, **(settings | overrides)
    )


@asynccontextmanager
async def scorer_with(
    policy: Policy = POLICY, stage1: float = 0.1, breakers: DependencyBreakers | None = None
) -> AsyncIterator[Cascade]:
    """A scorer on in-memory twins: stage 1 answers ``stage1``, stage 2 answers 0.9."""
    store = InMemoryOnlineStore()
    screener = InMemoryScreener(constant(stage1))
    heavy = InMemoryHeavyScorer(constant(0.9))
    async with PostAnswerWriter(store) as writer:
        scorer = make_scorer(
            store,
            screener,
            heavy,
            writer,
            policy=policy,
            breakers=breakers,
        )
        yield Cascade(scorer, store, screener, heavy, writer)


@pytest.fixture
async def cascade() -> AsyncIterator[Cascade]:
    async with scorer_with() as built:
        yield built


def budget(ms: float = 50) -> Budget:
    return Budget.start(ms / 1000, SETTINGS)


async def test_low_stage1_score_answers_without_stage2(cascade: Cascade) -> None:
    result = await cascade.scorer.score(make_transaction(), budget())
    assert result.decided_by is DecidedBy.STAGE1
    assert result.decision is Decision.APPROVE
    assert result.score == pytest.approx(0.1)
    assert not result.escalated and not result.degraded
    assert cascade.heavy.calls == 0
    assert result.timings.stage1_us > 0 and result.timings.total_us >= result.timings.stage1_us


async def test_score_in_band_escalates_to_stage2(cascade: Cascade) -> None:
    cascade.screener.score_fn = constant(0.5)
    result = await cascade.scorer.score(make_transaction(), budget())
    assert result.decided_by is DecidedBy.STAGE2
    assert result.escalated
    assert result.score == pytest.approx(0.9)
    assert result.stage1_score == pytest.approx(0.5)
    assert result.decision is Decision.DECLINE
    assert cascade.heavy.calls == 1


@pytest.mark.wallclock
async def test_slow_stage2_falls_back_to_stage1_within_budget(cascade: Cascade) -> None:
    cascade.screener.score_fn = constant(0.55)
    cascade.heavy.delay_s = 1.0
    start = time.monotonic()
    result = await cascade.scorer.score(make_transaction(), budget(30))
    elapsed_ms = (time.monotonic() - start) * 1000
    assert result.reasons == [Reason.STAGE2_TIMEOUT]
    assert result.decided_by is DecidedBy.STAGE1
    assert result.score == pytest.approx(0.55)
    assert result.decision is Decision.REVIEW
    assert result.degraded and result.escalated
    # Stage 2 gets what the budget leaves less its margin, and the answer comes inside the
    # 28 ms budget (30 ms deadline - 2 ms response margin), not after the 1 s stage 2.
    (stage2_timeout_s,) = cascade.heavy.timeouts_s
    assert stage2_timeout_s <= (30 - SETTINGS.response_margin_ms - SETTINGS.stage2_margin_ms) / 1000
    assert elapsed_ms < 30 + 3  # the deadline, plus a few ms of a shared machine's scheduling


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (DependencyUnavailable(Dependency.HEAVY, "down"), Reason.STAGE2_UNAVAILABLE),
        (DependencyOverloaded(Dependency.HEAVY, "queue full"), Reason.STAGE2_OVERLOADED),
        (DependencyFailed(Dependency.HEAVY, "boom"), Reason.STAGE2_ERROR),
    ],
)
async def test_stage2_failures_are_labelled(
    cascade: Cascade, failure: Exception, reason: Reason
) -> None:
    cascade.screener.score_fn = constant(0.4)
    cascade.heavy.failure = failure
    result = await cascade.scorer.score(make_transaction(), budget())
    assert result.reasons == [reason]
    assert result.decided_by is DecidedBy.STAGE1
    assert result.score == pytest.approx(0.4)


async def test_stage1_failure_gives_labelled_default(cascade: Cascade) -> None:
    cascade.screener.failure = DependencyUnavailable(Dependency.SCREENING, "no responders")
    result = await cascade.scorer.score(make_transaction(), budget())
    assert result.decided_by is DecidedBy.DEFAULT
    assert result.decision is Decision.REVIEW
    assert result.reasons == [Reason.STAGE1_UNAVAILABLE]
    assert cascade.heavy.calls == 0


@pytest.mark.wallclock
async def test_slow_stage1_times_out_inside_its_sub_budget(cascade: Cascade) -> None:
    cascade.screener.delay_s = 1.0
    start = time.monotonic()
    result = await cascade.scorer.score(make_transaction(), budget())
    elapsed_ms = (time.monotonic() - start) * 1000
    assert cascade.screener.timeouts_s == [SETTINGS.stage1_ms / 1000]  # its cap, not the budget
    assert elapsed_ms < SETTINGS.stage1_ms + 5
    assert result.reasons == [Reason.STAGE1_TIMEOUT]
    assert result.decided_by is DecidedBy.DEFAULT


@pytest.mark.wallclock
async def test_each_capped_stage_is_given_the_rest_of_the_budget_as_its_grace(
    cascade: Cascade,
) -> None:
    # The grace is only used when our own loop was away past the cap (orchestrator.expiry);
    # it must never reach past the call's budget.
    total_ms = 50 - SETTINGS.response_margin_ms
    await cascade.scorer.score(make_transaction(), budget())
    (redis_grace_s,) = cascade.store.graces_s
    (stage1_timeout_s,) = cascade.screener.timeouts_s
    (stage1_grace_s,) = cascade.screener.graces_s
    assert stage1_timeout_s == pytest.approx(SETTINGS.stage1_ms / 1000)
    assert total_ms - SETTINGS.redis_ms - 3 < redis_grace_s * 1000 <= total_ms - SETTINGS.redis_ms
    assert total_ms - SETTINGS.stage1_ms - 3 < stage1_grace_s * 1000
    assert stage1_timeout_s + stage1_grace_s <= total_ms / 1000


class _SlowOnce(InMemoryScreener):
    """Times out on its first request, as a worker off its core for a moment would."""

    async def screen(
        self, rows: npt.NDArray[np.float32], timeout_s: float, grace_s: float = 0.0
    ) -> npt.NDArray[np.float32]:
        if self.calls == 0:
            self.calls += 1
            raise DependencyTimeout(Dependency.SCREENING, "no reply in time")
        return await super().screen(rows, timeout_s, grace_s)


@pytest.mark.parametrize("batch", [True, False])
async def test_a_batch_chunk_sends_a_timed_out_stage1_request_once_more(batch: bool) -> None:
    screener = _SlowOnce(constant(0.1))
    store = InMemoryOnlineStore()
    async with PostAnswerWriter(store) as writer:
        scorer = make_scorer(store, screener, InMemoryHeavyScorer(constant(0.9)), writer)
        txs = [make_transaction(transaction_id=f"tx-{i}") for i in range(3)]
        if batch:
            results = await scorer.score_many(txs, Budget.start(1.0, SETTINGS, batch=True))
            # The chunk's second request answered: no default answers.
            assert screener.calls == 2
            assert [r.decided_by for r in results] == [DecidedBy.STAGE1] * 3
        else:  # a live call is not retried: its default answer comes at once
            result = await scorer.score(txs[0], budget())
            assert screener.calls == 1
            assert result.reasons == [Reason.STAGE1_TIMEOUT]


async def test_store_failure_still_answers_labelled(cascade: Cascade) -> None:
    cascade.store.failure = DependencyUnavailable(Dependency.REDIS, "refused")
    result = await cascade.scorer.score(make_transaction(), budget())
    assert result.decided_by is DecidedBy.STAGE1
    assert result.reasons == [Reason.CACHE_UNAVAILABLE, Reason.FEATURES_UNAVAILABLE]


async def test_repeat_transaction_is_served_from_cache(cascade: Cascade) -> None:
    tx = make_transaction()
    first = await cascade.scorer.score(tx, budget())
    await cascade.writer.flush()
    second = await cascade.scorer.score(tx, budget())
    assert second.decided_by is DecidedBy.CACHE
    assert second.decision is first.decision
    assert second.score == pytest.approx(first.score)
    assert cascade.screener.calls == 1


async def test_degraded_answers_are_not_cached(cascade: Cascade) -> None:
    cascade.screener.score_fn = constant(0.5)
    cascade.heavy.failure = DependencyUnavailable(Dependency.HEAVY, "down")
    tx = make_transaction()
    degraded = await cascade.scorer.score(tx, budget())
    await cascade.writer.flush()
    assert degraded.degraded
    assert cascade.store.cache == {}
    assert len(cascade.store.histories) == 1  # features still learn from the transaction
    cascade.heavy.failure = None
    again = await cascade.scorer.score(tx, budget())
    assert again.decided_by is DecidedBy.STAGE2
    assert not again.degraded


async def test_new_model_version_misses_the_cache(cascade: Cascade) -> None:
    tx = make_transaction()
    await cascade.scorer.score(tx, budget())
    await cascade.writer.flush()
    bumped = make_scorer(
        cascade.store,
        cascade.screener,
        cascade.heavy,
        cascade.writer,
        versions=dataclasses.replace(VERSIONS, stage1="s1-u"),
    )
    result = await bumped.score(tx, budget())
    assert result.decided_by is DecidedBy.STAGE1
    assert cascade.screener.calls == 2


async def test_history_grows_with_each_scored_transaction(cascade: Cascade) -> None:
    for i in range(3):
        await cascade.scorer.score(make_transaction(transaction_id=f"tx-{i}"), budget())
    await cascade.writer.flush()
    (entries,) = cascade.store.histories.values()
    assert len(entries) == 3


async def test_no_budget_left_answers_default_at_once(cascade: Cascade) -> None:
    result = await cascade.scorer.score(make_transaction(), budget(0.5))
    assert result.decided_by is DecidedBy.DEFAULT
    assert result.reasons == [Reason.BUDGET_EXHAUSTED]
    assert cascade.store.lookups == 0 and cascade.screener.calls == 0


async def test_in_band_without_time_for_stage2_is_labelled(cascade: Cascade) -> None:
    cascade.screener.score_fn = constant(0.5)
    cascade.screener.delay_s = 0.006
    result = await cascade.scorer.score(make_transaction(), budget(10))
    assert result.decided_by is DecidedBy.STAGE1
    assert Reason.BUDGET_EXHAUSTED in result.reasons
    assert cascade.heavy.calls == 0


async def test_batch_scores_like_sequential_calls(cascade: Cascade) -> None:
    # Two cards interleaved: each card's later transactions must see its earlier ones.
    txs = [
        make_transaction(
            transaction_id=f"b-{i}",
            card_id=f"card-{i % 2}",
            timestamp_ms=1_763_800_000_000 + i * 60_000,
        )
        for i in range(6)
    ]
    seen_rows: list[npt.NDArray[np.float32]] = []

    def record(rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        seen_rows.append(rows.copy())
        return np.full(rows.shape[0], 0.1, dtype=np.float32)

    cascade.screener.score_fn = record
    batch = await cascade.scorer.score_many(txs, budget())
    await cascade.writer.flush()
    assert [r.transaction_id for r in batch] == [tx.transaction_id for tx in txs]
    assert cascade.screener.calls == 1 and seen_rows[0].shape[0] == 6

    sequential = InMemoryOnlineStore()
    async with PostAnswerWriter(sequential) as writer:
        one_by_one = make_scorer(
            sequential,
            cascade.screener,
            cascade.heavy,
            writer,
        )
        for tx in txs:
            await one_by_one.score(tx, budget())
            await writer.flush()
    np.testing.assert_allclose(np.concatenate(seen_rows[1:]), seen_rows[0], rtol=1e-6)
    assert sequential.histories == cascade.store.histories


async def test_batch_escalates_only_rows_in_the_band_and_serves_cache_hits(
    cascade: Cascade,
) -> None:
    cached = make_transaction(transaction_id="seen-before")
    await cascade.scorer.score(cached, budget())
    await cascade.writer.flush()
    calls_before = cascade.screener.calls
    # amount drives nothing here; use the screener twin to put exactly one row in the band
    scores = iter([0.1, 0.5, 0.9])
    cascade.screener.score_fn = lambda rows: np.array(
        [next(scores) for _ in range(rows.shape[0])], dtype=np.float32
    )
    txs = [cached] + [
        make_transaction(transaction_id=f"new-{i}", card_id=f"c{i}") for i in range(3)
    ]
    results = await cascade.scorer.score_many(txs, budget())
    assert results[0].decided_by is DecidedBy.CACHE
    assert [r.decided_by for r in results[1:]] == [
        DecidedBy.STAGE1,
        DecidedBy.STAGE2,
        DecidedBy.STAGE1,
    ]
    assert [r.escalated for r in results[1:]] == [False, True, False]
    assert results[2].score == pytest.approx(0.9)  # the heavy twin's score
    assert cascade.screener.calls == calls_before + 1
    assert cascade.heavy.calls == 1


async def test_slow_redis_is_cut_off_at_its_cap_and_labelled(cascade: Cascade) -> None:
    cascade.store.delay_s = 1.0
    result = await cascade.scorer.score(make_transaction(), budget())
    assert result.timings.redis_us < 1000 * (SETTINGS.redis_ms + 3)  # cut off at the 5 ms cap
    assert result.reasons == [Reason.CACHE_UNAVAILABLE, Reason.FEATURES_UNAVAILABLE]
    assert result.decided_by is DecidedBy.STAGE1


async def test_escalations_beyond_the_stage2_limit_answer_overloaded_without_asking(
    cascade: Cascade,
) -> None:
    limited = make_scorer(
        cascade.store,
        cascade.screener,
        cascade.heavy,
        cascade.writer,
        stage2_max_in_flight=1,
    )
    cascade.screener.score_fn = constant(0.55)
    cascade.heavy.delay_s = 0.010
    first, second = await asyncio.gather(
        limited.score(make_transaction(transaction_id="a", card_id="ca"), budget()),
        limited.score(make_transaction(transaction_id="b", card_id="cb"), budget()),
    )
    assert first.decided_by is DecidedBy.STAGE2 and first.reasons == []
    assert second.reasons == [Reason.STAGE2_OVERLOADED]
    assert second.decided_by is DecidedBy.STAGE1 and second.escalated
    assert second.score == pytest.approx(0.55) and second.decision is Decision.REVIEW
    assert cascade.heavy.calls == 1
    assert limited.stage2_in_flight == 0
    third = await limited.score(make_transaction(transaction_id="c", card_id="cc"), budget())
    assert third.decided_by is DecidedBy.STAGE2  # the slot was given back
    assert cascade.heavy.calls == 2


def _feature_hash(rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """A score in [0, 1) that changes with any feature, so a history that differs shows."""
    flat = rows.reshape(rows.shape[0], -1).astype(np.float64)
    weights = np.linspace(0.37, 1.91, flat.shape[1])
    return np.asarray(np.abs(flat @ weights) % 1.0, dtype=np.float32)


async def test_chunked_batch_scores_like_the_same_transactions_one_by_one() -> None:
    # 23 transactions over 4 cards, 5 per chunk: every card has transactions in several chunks.
    txs = [
        make_transaction(
            transaction_id=f"chunked-{i}",
            card_id=f"card-{i % 4}",
            amount_minor=1_000 + 997 * i,
            merchant_id=f"m-{i % 3}",
            timestamp_ms=1_763_800_000_000 + i * 45_000,
        )
        for i in range(23)
    ]

    async def run(*, batch: bool) -> tuple[list[ScoreResult], InMemoryOnlineStore, int]:
        store = InMemoryOnlineStore()
        # A little latency per stage, so the post-answer writer could run between chunks.
        screener = InMemoryScreener(_feature_hash, delay_s=0.002)
        heavy = InMemoryHeavyScorer(_feature_hash, delay_s=0.001)
        async with PostAnswerWriter(store, linger_s=0.0) as writer:
            scorer = make_scorer(
                store,
                screener,
                heavy,
                writer,
                chunk_items=5,
            )
            if batch:
                results = await scorer.score_many(txs, Budget.start(1.0, SETTINGS, batch=True))
            else:
                results = []
                for tx in txs:
                    results.append(await scorer.score(tx, budget()))
                    await writer.flush()
            await writer.flush()
        return results, store, screener.calls

    batch, batch_store, batch_screens = await run(batch=True)
    single, single_store, _ = await run(batch=False)
    assert batch_screens == 5  # ceil(23 / 5) chunks, one stage-1 request each
    assert [r.transaction_id for r in batch] == [tx.transaction_id for tx in txs]

    def outcome(r: ScoreResult) -> tuple[object, ...]:
        return (r.decision, r.decided_by, r.escalated, r.reasons)

    assert [outcome(r) for r in batch] == [outcome(r) for r in single]
    assert any(r.decided_by is DecidedBy.STAGE2 for r in batch)
    assert any(r.decided_by is DecidedBy.STAGE1 for r in batch)
    assert not any(r.degraded for r in batch)
    np.testing.assert_allclose([r.score for r in batch], [r.score for r in single], rtol=1e-6)
    assert [r.stage1_score for r in batch] == pytest.approx([r.stage1_score for r in single])
    assert batch_store.histories == single_store.histories
    assert batch_store.cache.keys() == single_store.cache.keys()


@pytest.mark.parametrize(("batch_budget_s", "share"), [(1.0, 0.5), (1.0, 0.25), (0.001, 0.5)])
async def test_a_batch_pauses_between_chunks_for_its_share_and_only_within_its_budget(
    batch_budget_s: float, share: float
) -> None:
    txs = [make_transaction(transaction_id=f"defer-{i}", card_id=f"c-{i % 3}") for i in range(12)]
    asked: list[tuple[float, float]] = []

    async def defer(pause_s: float, window_s: float) -> None:
        asked.append((pause_s, window_s))

    store = InMemoryOnlineStore()
    screener = InMemoryScreener(_feature_hash, delay_s=0.002)
    async with PostAnswerWriter(store, linger_s=0.0) as writer:
        scorer = make_scorer(
            store,
            screener,
            InMemoryHeavyScorer(_feature_hash),
            writer,
            chunk_items=4,
            batch_share=share,
        )
        started = time.monotonic()
        await scorer.score_many(txs, Budget.start(batch_budget_s, SETTINGS, batch=True), defer)
        elapsed_s = time.monotonic() - started
    assert len(asked) == 2  # between the 3 chunks, not before the first
    # The window is the chunk just done: under half the batch.
    assert all(window_s < elapsed_s / 2 for _, window_s in asked)
    if batch_budget_s < 0.01:  # no budget left for the chunks: nothing to give away
        assert all(pause_s <= 0 for pause_s, _ in asked)
    else:  # at least the screener's 2 ms; the pause leaves the batch its share of the time
        assert all(window_s >= 0.002 for _, window_s in asked)
        ratio = (1 - share) / share
        assert [p for p, _ in asked] == pytest.approx([w * ratio for _, w in asked])


# --- features unavailable: the policy's own section decides -----------------------------------

DEGRADED = FeaturesUnavailable(review_threshold=0.05, decline_threshold=0.3)
POLICY_WITH_SECTION = POLICY.model_copy(update={"features_unavailable": DEGRADED})
SEVERITY = {Decision.APPROVE: 0, Decision.REVIEW: 1, Decision.DECLINE: 2}


async def test_features_unavailable_answers_by_the_degraded_thresholds() -> None:
    async with scorer_with(POLICY_WITH_SECTION, 0.1) as cascade:
        normal = await cascade.scorer.score(make_transaction(transaction_id="n"), budget())
        assert normal.decision is Decision.APPROVE and not normal.degraded  # 0.1 < 0.5
        cascade.store.failure = DependencyUnavailable(Dependency.REDIS, "refused")
        result = await cascade.scorer.score(make_transaction(transaction_id="d"), budget())
    assert result.decision is Decision.REVIEW  # 0.1 >= the section's 0.05
    assert result.reasons == [Reason.CACHE_UNAVAILABLE, Reason.FEATURES_UNAVAILABLE]
    assert result.degraded and result.decided_by is DecidedBy.STAGE1
    assert not result.escalated and cascade.heavy.calls == 0


@pytest.mark.parametrize("stage1", [0.0, 0.01, 0.05, 0.1, 0.29, 0.3, 0.5, 0.69, 0.75, 0.99])
async def test_features_unavailable_is_never_more_permissive_than_its_section(
    stage1: float,
) -> None:
    async with scorer_with(POLICY_WITH_SECTION, stage1) as cascade:
        cascade.store.failure = DependencyUnavailable(Dependency.REDIS, "refused")
        result = await cascade.scorer.score(make_transaction(), budget())
        assert cascade.heavy.calls == 0
    assert result.decision == Decision(DEGRADED.as_policy("x").decide(stage1))
    assert result.score == pytest.approx(stage1)


async def test_features_unavailable_escalates_only_in_the_sections_band() -> None:
    section = FeaturesUnavailable(
        review_threshold=0.05, decline_threshold=0.95, escalate=True, escalate_low=0.2,
        escalate_high=0.4,
    )  # fmt: skip
    policy = POLICY.model_copy(update={"features_unavailable": section})
    async with scorer_with(policy, 0.25) as cascade:  # outside the normal band [0.3, 0.7)
        cascade.store.failure = DependencyUnavailable(Dependency.REDIS, "refused")
        result = await cascade.scorer.score(make_transaction(), budget())
        assert cascade.heavy.calls == 1
    assert result.escalated and result.decided_by is DecidedBy.STAGE2
    assert result.score == pytest.approx(0.9) and result.decision is Decision.REVIEW  # < 0.95
    assert result.reasons == [Reason.CACHE_UNAVAILABLE, Reason.FEATURES_UNAVAILABLE]


async def test_batch_without_features_uses_the_degraded_thresholds() -> None:
    txs = [make_transaction(transaction_id=f"b-{i}", card_id=f"c-{i}") for i in range(5)]
    async with scorer_with(POLICY_WITH_SECTION, 0.4) as cascade:  # normal: in band, REVIEW
        cascade.store.failure = DependencyUnavailable(Dependency.REDIS, "refused")
        results = await cascade.scorer.score_many(txs, budget())
        assert cascade.heavy.calls == 0
    assert {r.decision for r in results} == {Decision.DECLINE}  # 0.4 >= the section's 0.3
    assert all(r.decided_by is DecidedBy.STAGE1 and r.degraded for r in results)


async def test_policy_without_section_keeps_its_normal_meaning() -> None:
    async with scorer_with(POLICY, 0.1) as cascade:
        cascade.store.failure = DependencyUnavailable(Dependency.REDIS, "refused")
        result = await cascade.scorer.score(make_transaction(), budget())
    assert result.decision is Decision.APPROVE  # policy-1 and policy-2 decide as they always did


def test_committed_policy_is_stricter_without_features() -> None:
    """For any stage-1 score, the served degraded answer is at least as severe as the normal
    one; the scores that the normal policy approves without history are what it exists for."""
    registry = load_registry(DEFAULT_MODEL_DIR)
    policy = load_policy(registry.policy_path)
    assert policy.features_unavailable is not None
    degraded = policy.when_features_unavailable()
    assert degraded.version == policy.version
    scores = [0.0, 1e-7, *np.geomspace(1e-6, 1.0, 400).tolist()]
    for score in scores:
        assert SEVERITY[decide(score, degraded)] >= SEVERITY[decide(score, policy)], score
    assert decide(policy.features_unavailable.review_threshold, degraded) is not Decision.APPROVE
    assert decide(policy.features_unavailable.review_threshold, policy) is Decision.APPROVE


def _in_band_hash(rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """A stage-1 score inside POLICY's band (so stage 2 is asked) that changes with any feature."""
    return np.asarray(0.35 + 0.3 * _feature_hash(rows), dtype=np.float32)


def _recorder(score_fn: ScoreFn) -> tuple[ScoreFn, list[npt.NDArray[np.float32]]]:
    """``score_fn``, also keeping each request's rows in the returned list."""
    seen: list[npt.NDArray[np.float32]] = []

    def record(rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        seen.append(rows.copy())
        return score_fn(rows)

    return record, seen


def _one_history(store: InMemoryOnlineStore) -> list[HistoryEntry]:
    (raw,) = store.histories.values()
    return [decode_history_entry(b) for b in raw]


async def _score_prior(cascade: Cascade, n: int, start_ms: int) -> None:
    for i in range(n):
        tx = make_transaction(transaction_id=f"prior-{i}", timestamp_ms=start_ms + i * 1000)
        await cascade.scorer.score(tx, budget())
    await cascade.writer.flush()


async def test_a_retry_of_a_degraded_answer_sees_the_history_its_first_attempt_saw(
    cascade: Cascade,
) -> None:
    """A degraded answer is not cached, so its retry is scored again, after its own entry was
    written: that entry must not count in the retry's history, nor enter the history twice."""
    await _score_prior(cascade, 3, 1_763_800_000_000)
    cascade.screener.score_fn, rows = _recorder(_in_band_hash)
    cascade.heavy.failure = DependencyUnavailable(Dependency.HEAVY, "down")
    tx = make_transaction(transaction_id="retried", timestamp_ms=1_763_800_060_000)
    first = await cascade.scorer.score(tx, budget())
    await cascade.writer.flush()
    history = _one_history(cascade.store)
    assert len(history) == 4 and history[0].transaction_id == "retried"
    second = await cascade.scorer.score(tx, budget())
    await cascade.writer.flush()
    assert first.degraded and first.reasons == [Reason.STAGE2_UNAVAILABLE]
    assert len(cascade.store.cache) == 3  # the prior transactions' answers only
    assert _one_history(cascade.store) == history
    assert (second.decision, second.score, second.reasons) == (
        first.decision,
        first.score,
        first.reasons,
    )
    np.testing.assert_array_equal(rows[1], rows[0])
    assert rows[0][0, SCREENING_FEATURE_NAMES.index("count_10m")] == 3


async def test_a_retry_of_a_default_answer_enters_the_history_once(cascade: Cascade) -> None:
    await _score_prior(cascade, 2, 1_763_800_000_000)
    cascade.screener.failure = DependencyUnavailable(Dependency.SCREENING, "no worker")
    tx = make_transaction(transaction_id="retried", timestamp_ms=1_763_800_060_000)
    first = await cascade.scorer.score(tx, budget())
    await cascade.writer.flush()
    history = _one_history(cascade.store)
    second = await cascade.scorer.score(tx, budget())
    await cascade.writer.flush()
    assert first.decided_by is DecidedBy.DEFAULT
    assert (second.decision, second.reasons) == (first.decision, first.reasons)
    assert _one_history(cascade.store) == history and len(history) == 3
    # Once stage 1 is back, the retry reads the two earlier transactions, not itself.
    cascade.screener.failure = None
    cascade.screener.score_fn, record_rows = _recorder(constant(0.1))
    await cascade.scorer.score(tx, budget())
    np.testing.assert_array_equal(record_rows[0][0], screening_features(tx, history[1:]))


async def test_an_older_transaction_reads_only_older_entries(cascade: Cascade) -> None:
    await _score_prior(cascade, 4, 1_763_800_000_000)  # prior-0..3 at +0, +1, +2, +3 s
    cascade.screener.score_fn, rows = _recorder(constant(0.1))
    late = make_transaction(transaction_id="late", timestamp_ms=1_763_800_001_500)
    await cascade.scorer.score(late, budget())
    await cascade.writer.flush()
    history = _one_history(cascade.store)
    assert [e.transaction_id for e in history] == [
        "prior-3",
        "prior-2",
        "late",
        "prior-1",
        "prior-0",
    ]
    np.testing.assert_array_equal(rows[0][0], screening_features(late, history[3:]))
    assert rows[0][0, SCREENING_FEATURE_NAMES.index("count_10m")] == 2


async def test_batch_of_shuffled_and_repeated_transactions_scores_like_one_by_one() -> None:
    """Out of order within and across chunks, the same batch sent twice (stage 2 down, so nothing
    is cached and the second batch is scored again): the in-batch history follows the store's
    rule (the offline replay's values), and the second batch adds no entry."""
    rng = random.Random(4)
    txs = [
        make_transaction(
            transaction_id=f"shuffled-{i}",
            card_id=f"card-{i % 3}",
            amount_minor=1_000 + 991 * i,
            timestamp_ms=1_763_800_000_000 + rng.randint(0, 40) * 30_000,
        )
        for i in range(20)
    ]

    async def run(*, batch: bool) -> tuple[list[npt.NDArray[np.float32]], InMemoryOnlineStore]:
        store = InMemoryOnlineStore()
        rows: list[npt.NDArray[np.float32]] = []

        def record(batch_rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
            rows.extend(batch_rows.copy())
            return _in_band_hash(batch_rows)

        heavy = InMemoryHeavyScorer(
            _feature_hash, failure=DependencyUnavailable(Dependency.HEAVY, "down")
        )
        async with PostAnswerWriter(store, linger_s=0.0) as writer:
            scorer = make_scorer(
                store,
                InMemoryScreener(record),
                heavy,
                writer,
                chunk_items=6,
            )
            for _ in range(2):
                if batch:
                    results = await scorer.score_many(txs, Budget.start(1.0, SETTINGS, batch=True))
                    assert all(r.degraded for r in results)
                else:
                    for tx in txs:
                        await scorer.score(tx, budget())
                        await writer.flush()
                await writer.flush()
        return rows, store

    batch_rows, batch_store = await run(batch=True)
    single_rows, single_store = await run(batch=False)
    np.testing.assert_array_equal(np.stack(batch_rows), np.stack(single_rows))
    assert batch_store.histories == single_store.histories
    offline = CardHistories()
    for tx, row in zip(txs, batch_rows[:20], strict=True):
        np.testing.assert_array_equal(row, screening_features(tx, offline.history_for(tx)))
        offline.append(tx)
    # The second time, every transaction reads all the others older than itself, not itself.
    for tx, row in zip(txs, batch_rows[20:], strict=True):
        np.testing.assert_array_equal(row, screening_features(tx, offline.history_for(tx)))
    for card in ("card-0", "card-1", "card-2"):
        raw = batch_store.histories[card_history_key(card, VERSIONS.feature_set)]
        assert [decode_history_entry(b) for b in raw] == offline.history(card)


async def test_in_memory_store_keeps_one_entry_per_id_in_timestamp_order() -> None:
    store = InMemoryOnlineStore()
    key = card_history_key("card-42", "fs-1")
    txs = [
        make_transaction(transaction_id=f"t{i}", timestamp_ms=1_763_800_000_000 - i)
        for i in (2, 0, 1)
    ]
    for tx in txs * 2:
        await store.write([StoreWrite(key, encode_history_entry(history_entry(tx)))])
    assert [decode_history_entry(b).transaction_id for b in store.histories[key]] == [
        "t0",
        "t1",
        "t2",
    ]
