"""Online/offline parity: a simulated stream scored through the real online path (the cascade
scorer, real Redis, the post-answer writer) produces exactly the feature rows and sequences that
training computes offline with ``CardHistories``."""

from __future__ import annotations

import uuid

import numpy as np
import numpy.typing as npt
import pytest
from opentelemetry.trace import NoOpTracer

from cascade.features import CardHistories, screening_features, sequence_tensor
from cascade.model_registry import Policy
from cascade.servers import RedisServer
from cascade.settings import BudgetSettings, DefaultDecision
from orchestrator.budget import Budget
from orchestrator.heavy_client import InMemoryHeavyScorer
from orchestrator.online_store import RedisOnlineStore
from orchestrator.post_answer import PostAnswerWriter
from orchestrator.results import ModelVersions
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


async def test_online_features_match_offline_replay(redis_server: RedisServer) -> None:
    stream = simulate(SimulationConfig(seed=11, n_cards=40, n_days=20))
    assert len(stream) > 500 and any(r.is_fraud for r in stream)
    rows_seen: list[npt.NDArray[np.float32]] = []
    sequences_seen: list[npt.NDArray[np.float32]] = []

    def record_rows(rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        rows_seen.append(rows.copy())
        return np.full(rows.shape[0], 0.5, dtype=np.float32)

    def record_sequences(seqs: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        sequences_seen.append(seqs.copy())
        return np.full(seqs.shape[0], 0.5, dtype=np.float32)

    # A fresh feature-set namespace per run, so earlier runs' histories do not leak in.
    versions = ModelVersions("parity", "s1", "s2", f"fs-parity-{uuid.uuid4().hex[:8]}")
    async with (
        RedisOnlineStore(redis_server.url, cache_ttl_s=600, feature_ttl_s=600) as store,
        PostAnswerWriter(store) as writer,
    ):
        scorer = CascadeScorer(
            store=store,
            screener=InMemoryScreener(record_rows),
            heavy=InMemoryHeavyScorer(record_sequences),
            policy=ESCALATE_ALL,
            versions=versions,
            budget=BUDGET,
            default_decision=DefaultDecision.REVIEW,
            writer=writer,
            tracer=NoOpTracer(),
        )
        for record in stream:
            result = await scorer.score(record.tx, Budget.start(None, BUDGET))
            assert not result.degraded, result.reasons
            await writer.flush()  # the next transaction of the card must see this one

    offline = CardHistories()
    expected_rows, expected_sequences = [], []
    for record in stream:
        history = offline.history(record.tx.card_id)
        expected_rows.append(screening_features(record.tx, history))
        expected_sequences.append(sequence_tensor(record.tx, history))
        offline.append(record.tx)
    online_rows = np.concatenate(rows_seen)
    online_sequences = np.concatenate(sequences_seen)
    assert online_rows.shape == (len(stream), *expected_rows[0].shape)
    np.testing.assert_array_equal(online_rows, np.stack(expected_rows))
    np.testing.assert_array_equal(online_sequences, np.stack(expected_sequences))
    # Cards with a long past exercise the 64-entry cap on both sides.
    assert max(len(offline.history(r.tx.card_id)) for r in stream) == 64
