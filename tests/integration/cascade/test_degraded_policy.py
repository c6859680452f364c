"""Redis down, real servers: answers come from the policy's features-unavailable section.

Simulator transactions are scored offline on an empty history (what the orchestrator has when
the lookup fails) with the committed stage-1 model; with Redis stopped under a running cascade
each must get the decision the section gives that score (``docs/degraded_policy.md`` measured
them), and fraud that the normal thresholds would approve must not be approved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import pytest

from cascade.features import screening_features
from cascade.model_registry import Policy, load_policy, load_registry
from cascade.settings import DEFAULT_MODEL_DIR
from cascade.v1 import scoring_pb2
from cascade.wire import to_wire
from devstack.servers import NatsServer, TritonServer
from tests.integration.cascade.conftest import cascade_with_own_redis
from training.evaluation import stage1_scores
from training.simulator import SimulationConfig, simulate

pytestmark = pytest.mark.integration

R = scoring_pb2
_WORLD: Final = SimulationConfig(seed=7, n_cards=200, n_days=20)
_DECISIONS: Final = {
    "APPROVE": R.DECISION_APPROVE,
    "REVIEW": R.DECISION_REVIEW,
    "DECLINE": R.DECISION_DECLINE,
}


@dataclass(frozen=True, slots=True)
class Case:
    """A simulator transaction, its empty-history stage-1 score and ground truth."""

    tx: scoring_pb2.Transaction
    stage1: float
    pattern: str  # "" for genuine


def _clear_of(score: float, policy: Policy) -> bool:
    """Not within 1% of a threshold, so float noise cannot flip the expected decision."""
    cuts = (policy.review_threshold, policy.decline_threshold, policy.escalate_low)
    return all(abs(score - cut) > 0.01 * cut for cut in cuts)


def _pick_cases(degraded: Policy, normal: Policy) -> list[Case]:
    """Per fraud pattern one transaction the normal policy would approve without history and
    the section flags; one fraud the section declines; genuine ones it approves and reviews."""
    records = simulate(_WORLD)
    features = np.stack([screening_features(r.tx, ()) for r in records])
    scores = stage1_scores(load_registry(DEFAULT_MODEL_DIR).stage1_path, features).tolist()
    quota: dict[tuple[str, str], int] = {("genuine", "APPROVE"): 2, ("genuine", "REVIEW"): 1}
    cases: list[Case] = []
    cards: set[str] = set()
    for record, score in zip(records, scores, strict=True):
        if record.tx.card_id in cards or not _clear_of(score, degraded):
            continue
        served = degraded.decide(score)
        key: tuple[str, str]
        if not record.is_fraud:
            key = ("genuine", served)
        elif served == "DECLINE":
            key = ("fraud", served)
        elif (
            served == "REVIEW" and not normal.escalates(score) and normal.decide(score) == "APPROVE"
        ):
            key = (record.pattern, "missed by the normal thresholds")
        else:
            continue
        if quota.setdefault(key, 1 if record.is_fraud else 0) > 0:
            quota[key] -= 1
            cards.add(record.tx.card_id)
            cases.append(Case(to_wire(record.tx), score, record.pattern))
    return cases


async def test_redis_down_answers_give_the_measured_degraded_decisions(
    model_dir: Path, nats_server: NatsServer, heavy_triton: TritonServer, tmp_path: Path
) -> None:
    served_policy = load_policy(load_registry(model_dir).policy_path)
    assert served_policy.features_unavailable is not None, "the active policy has no section"
    degraded = served_policy.when_features_unavailable()
    committed = load_policy(load_registry(DEFAULT_MODEL_DIR).policy_path)
    normal = committed.model_copy(update={"features_unavailable": None})  # the baseline
    cases = _pick_cases(degraded, normal)
    missed_by_baseline = [c for c in cases if c.pattern and degraded.decide(c.stage1) == "REVIEW"]
    assert len(missed_by_baseline) >= 3, "the small world should hold such fraud"
    assert any(c.pattern and degraded.decide(c.stage1) == "DECLINE" for c in cases)
    assert {degraded.decide(c.stage1) for c in cases if not c.pattern} == {"APPROVE", "REVIEW"}

    async with cascade_with_own_redis(
        model_dir, tmp_path, nats_url=nats_server.url, triton_url=heavy_triton.grpc_url
    ) as (stub, doomed):
        await doomed.stop()
        replies = [await stub.Score(R.ScoreRequest(transaction=c.tx), timeout=1.0) for c in cases]
        batch = await stub.ScoreBatch(
            R.ScoreBatchRequest(transactions=[c.tx for c in cases]), timeout=2.0
        )

    for case, reply, in_batch in zip(cases, replies, batch.results, strict=True):
        for answer in (reply, in_batch):
            what = f"{case.tx.transaction_id} ({case.pattern or 'genuine'}, {case.stage1:.3g})"
            assert answer.degraded, what
            assert R.REASON_CACHE_UNAVAILABLE in answer.reasons, what
            assert R.REASON_FEATURES_UNAVAILABLE in answer.reasons, what
            assert answer.decided_by == R.DECIDED_BY_STAGE1, what  # the section does not escalate
            assert not answer.escalated, what
            assert answer.stage1_score == pytest.approx(case.stage1, rel=1e-5), what
            assert answer.decision == _DECISIONS[degraded.decide(case.stage1)], what
            if case.pattern:
                assert answer.decision != R.DECISION_APPROVE, what
    for case in missed_by_baseline:  # what the normal thresholds would have let through
        assert normal.decide(case.stage1) == "APPROVE"
