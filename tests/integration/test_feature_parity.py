"""Online/offline parity: a simulated stream scored through the real online path (the cascade
scorer, real Redis, the post-answer writer) produces exactly the feature rows and sequences that
training computes offline with ``CardHistories``: in time order, and also when transactions
arrive out of order, are sent more than once (retries, a whole replay) or are scored concurrently
with others of their card."""

from __future__ import annotations

import asyncio
import contextvars
import random
import uuid
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest
from opentelemetry.trace import NoOpTracer

from cascade.decision import Decision
from cascade.errors import Dependency, DependencyUnavailable
from cascade.features import (
    HISTORY_LEN,
    CardHistories,
    decode_history_entry,
    screening_features,
    sequence_tensor,
)
from cascade.model_registry import Policy
from cascade.settings import BudgetSettings
from cascade.transaction import Transaction
from devstack.servers import RedisServer
from orchestrator.budget import Budget
from orchestrator.heavy_client import InMemoryHeavyScorer
from orchestrator.online_store import RedisOnlineStore, card_history_key
from orchestrator.post_answer import PostAnswerWriter
from orchestrator.results import DecidedBy, ModelVersions, Reason
from orchestrator.scoring import CascadeScorer
from orchestrator.screening_client import InMemoryScreener
from training.simulator import SimulationConfig, simulate

pytestmark = pytest.mark.integration

# Generous: this test is about values, not time.
BUDGET = BudgetSettings(slo_ms=10_000, redis_ms=1_000, stage1_ms=1_000)
ESCALATE_ALL = Policy(
    version="parity",
    escalate_low=0.0,
    escalate_high=1.0,
    review_threshold=0.5,
    decline_threshold=0.9,
)

Array = npt.NDArray[np.float32]
# Which call of the replay a stage request belongs to (each call runs in its own task).
_CALL: contextvars.ContextVar[int] = contextvars.ContextVar("call")

# Waves: the transactions of one wave are scored concurrently, each wave once the previous one's
# history writes have landed. A wave of one is a transaction sent on its own.
Waves = Sequence[Sequence[Transaction]]


async def replay_online(
    redis_url: str, waves: Waves, *, stage2_down: bool = False
) -> tuple[dict[int, Array], dict[int, Array], dict[str, list[bytes]]]:
    """Score ``waves`` through the real online path; the stage-1 row and stage-2 sequence each
    call sent (by call number, counting across waves), and every card's stored history after.
    With ``stage2_down`` stage 2 records its input and fails: answers are degraded, never cached,
    so a transaction sent again is scored again."""
    rows: dict[int, Array] = {}
    sequences: dict[int, Array] = {}

    def record_rows(batch: Array) -> Array:
        (rows[_CALL.get()],) = batch.copy()
        return np.full(batch.shape[0], 0.5, dtype=np.float32)

    def record_sequences(batch: Array) -> Array:
        (sequences[_CALL.get()],) = batch.copy()
        if stage2_down:
            raise DependencyUnavailable(Dependency.HEAVY, "down")
        return np.full(batch.shape[0], 0.5, dtype=np.float32)

    # A fresh feature-set namespace per run, so earlier runs' histories do not leak in.
    versions = ModelVersions("parity", "s1", "s2", f"fs-parity-{uuid.uuid4().hex[:8]}")
    async with (
        RedisOnlineStore(redis_url, cache_ttl_s=600, feature_ttl_s=600) as store,
        PostAnswerWriter(store) as writer,
    ):
        scorer = CascadeScorer(
            store=store,
            screener=InMemoryScreener(record_rows),
            heavy=InMemoryHeavyScorer(record_sequences),
            policy=ESCALATE_ALL,
            versions=versions,
            budget=BUDGET,
            default_decision=Decision.REVIEW,
            writer=writer,
            tracer=NoOpTracer(),
        )

        async def call(number: int, tx: Transaction) -> None:
            _CALL.set(number)
            result = await scorer.score(tx, Budget.start(None, BUDGET))
            assert result.decided_by is not DecidedBy.CACHE  # every call is scored
            assert result.reasons == ([Reason.STAGE2_UNAVAILABLE] if stage2_down else [])

        number = 0
        for wave in waves:
            await asyncio.gather(*(call(number + k, tx) for k, tx in enumerate(wave)))
            number += len(wave)
            await writer.flush()  # the next wave must see this one
        cards = sorted({tx.card_id for wave in waves for tx in wave})
        keys = [("out:none", card_history_key(card, versions.feature_set)) for card in cards]
        lookups = await store.lookup(keys, timeout_s=5.0)
    assert len(rows) == len(sequences) == number
    return rows, sequences, {c: lk.history for c, lk in zip(cards, lookups, strict=True)}


def replay_offline(waves: Waves) -> tuple[list[Array], list[Array], CardHistories]:
    """The same waves through ``CardHistories``: each wave featurised from the histories as the
    previous waves left them, then added."""
    offline = CardHistories()
    rows, sequences = [], []
    for wave in waves:
        histories = [offline.history_for(tx) for tx in wave]
        rows += [screening_features(tx, h) for tx, h in zip(wave, histories, strict=True)]
        sequences += [sequence_tensor(tx, h) for tx, h in zip(wave, histories, strict=True)]
        for tx in wave:
            offline.append(tx)
    return rows, sequences, offline


async def assert_parity(
    redis_url: str, waves: Waves, *, stage2_down: bool = False
) -> CardHistories:
    """Online and offline replays of ``waves`` give identical inputs and identical histories."""
    online_rows, online_sequences, stored = await replay_online(
        redis_url, waves, stage2_down=stage2_down
    )
    expected_rows, expected_sequences, offline = replay_offline(waves)
    n = len(expected_rows)
    np.testing.assert_array_equal(np.stack([online_rows[k] for k in range(n)]), expected_rows)
    np.testing.assert_array_equal(
        np.stack([online_sequences[k] for k in range(n)]), expected_sequences
    )
    for card, raw in stored.items():
        assert [decode_history_entry(b) for b in raw] == offline.history(card)
    return offline


def _stream(seed: int = 11, n_cards: int = 40) -> list[Transaction]:
    stream = [r.tx for r in simulate(SimulationConfig(seed=seed, n_cards=n_cards, n_days=20))]
    assert len(stream) > 15 * n_cards
    return stream


def one_by_one(txs: Sequence[Transaction]) -> Waves:
    return [[tx] for tx in txs]


async def test_online_features_match_offline_replay(redis_server: RedisServer) -> None:
    stream = simulate(SimulationConfig(seed=11, n_cards=40, n_days=20))
    assert len(stream) > 500 and any(r.is_fraud for r in stream)
    offline = await assert_parity(redis_server.url, one_by_one([r.tx for r in stream]))
    # Cards with a long past exercise the 64-entry cap on both sides.
    assert max(len(offline.history(r.tx.card_id)) for r in stream) == HISTORY_LEN


async def test_out_of_order_arrivals_match_offline_replay(redis_server: RedisServer) -> None:
    """Each transaction arrives late, three hours on average: many overtake others of their card."""
    rng = random.Random(3)
    stream = _stream()
    arrival = {
        tx.transaction_id: tx.timestamp_ms + rng.expovariate(1 / 10_800_000) for tx in stream
    }
    late = sorted(stream, key=lambda tx: arrival[tx.transaction_id])
    newest: dict[str, int] = {}
    overtaken = 0  # arrivals older than one of their card that arrived before
    for tx in late:
        overtaken += tx.timestamp_ms < newest.get(tx.card_id, 0)
        newest[tx.card_id] = max(tx.timestamp_ms, newest.get(tx.card_id, 0))
    assert overtaken > 50
    offline = await assert_parity(redis_server.url, one_by_one(late))
    for card in {tx.card_id for tx in stream}:
        history = offline.history(card)
        keys = [(e.timestamp_ms, e.transaction_id) for e in history]
        assert keys == sorted(keys, reverse=True)


async def test_retries_and_a_whole_replay_match_offline_replay(redis_server: RedisServer) -> None:
    """Degraded answers (stage 2 down) are not cached: a fifth of the transactions are sent again
    a little later, then the whole stream a second time over the same Redis. No transaction
    enters its card's history twice, and every call reads what the offline rule says."""
    rng = random.Random(4)
    stream = _stream(seed=12, n_cards=25)
    sent: list[Transaction] = []
    for tx in stream:
        sent.append(tx)
        if rng.random() < 0.2:
            sent.insert(len(sent) + rng.randint(0, 30), tx)  # lands within the next 30 sends
    sent += stream
    offline = await assert_parity(redis_server.url, one_by_one(sent), stage2_down=True)
    for card in {tx.card_id for tx in stream}:
        ids = [e.transaction_id for e in offline.history(card)]
        assert (
            len(ids) == len(set(ids)) == min(HISTORY_LEN, sum(tx.card_id == card for tx in stream))
        )


async def test_concurrent_same_card_calls_match_offline_replay(redis_server: RedisServer) -> None:
    """A few cards, scored 12 at a time (one transaction of each wave twice, as a client retrying
    before its first answer came back), in waves slightly out of order."""
    rng = random.Random(5)
    stream = _stream(seed=13, n_cards=4)
    waves: list[list[Transaction]] = []
    for start in range(0, len(stream), 11):
        wave = stream[start : start + 11]
        wave.append(rng.choice(wave))
        rng.shuffle(wave)
        waves.append(wave)
    same_card = sum(len(w) - len({tx.card_id for tx in w}) for w in waves)
    assert same_card > 3 * len(waves)
    await assert_parity(redis_server.url, waves)
