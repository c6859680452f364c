"""The decision record's encoding: what goes in comes back, subjects and message ids are safe."""

from __future__ import annotations

import numpy as np
import pytest

from cascade.decision_record import (
    METHOD_SCORE,
    METHOD_SCORE_BATCH,
    PendingDecision,
    decision_subject,
    decode_decision,
    encode_decision,
    message_id,
)
from cascade.v1 import scoring_pb2
from tests.conftest import make_wire_transaction


def answer(**overrides: object) -> scoring_pb2.ScoreResponse:
    fields: dict[str, object] = {
        "transaction_id": "tx-0001",
        "decision": scoring_pb2.DECISION_DECLINE,
        "score": 0.875,
        "decided_by": scoring_pb2.DECIDED_BY_STAGE2,
        "reasons": [],
        "versions": scoring_pb2.ModelVersions(
            policy="policy-3", stage1="s1-1", stage2="s2-1", feature_set="fs-1"
        ),
        "timings": scoring_pb2.StageTimings(total_us=1500, stage1_us=400, stage2_us=900),
        "trace_id": "ab" * 16,
        "escalated": True,
        "stage1_score": 0.25,
    }
    fields.update(overrides)
    return scoring_pb2.ScoreResponse(**fields)  # type: ignore[arg-type]


def test_a_record_holds_the_transaction_answer_features_and_stage_scores() -> None:
    tx = make_wire_transaction()
    features = np.arange(47, dtype=np.float32) / 4
    data = encode_decision(PendingDecision(tx, answer(), features, 1_796_000_000_123, METHOD_SCORE))
    record = decode_decision(data)
    assert record.transaction == tx
    assert record.answer == answer()
    assert list(record.features) == features.tolist()
    assert record.HasField("stage2_score") and record.stage2_score == pytest.approx(0.875)
    assert record.answer.stage1_score == pytest.approx(0.25)
    assert record.decided_at_ms == 1_796_000_000_123
    assert record.method == METHOD_SCORE


def test_a_default_answer_has_no_stage2_score_and_may_have_no_features() -> None:
    shed = answer(
        decided_by=scoring_pb2.DECIDED_BY_DEFAULT,
        decision=scoring_pb2.DECISION_REVIEW,
        score=0.5,
        reasons=[scoring_pb2.REASON_OVERLOADED],
        escalated=False,
        stage1_score=0.0,
    )
    data = encode_decision(
        PendingDecision(make_wire_transaction(), shed, None, 1, METHOD_SCORE_BATCH)
    )
    record = decode_decision(data)
    assert not record.HasField("stage2_score")
    assert list(record.features) == []
    assert list(record.answer.reasons) == [scoring_pb2.REASON_OVERLOADED]
    assert record.method == METHOD_SCORE_BATCH


def test_decoding_garbage_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="DecisionRecord"):
        decode_decision(b"\xff\xff\xff")


def test_subjects_name_the_policy_version_and_refuse_wildcards() -> None:
    assert decision_subject("decisions", "policy-3") == "decisions.policy-3"
    assert decision_subject("audit.decisions", "p_1") == "audit.decisions.p_1"
    for bad in ("policy 3", "policy.*", ">", "", "policy..3"):
        with pytest.raises(ValueError, match="not a NATS subject"):
            decision_subject("decisions", bad)


def test_only_a_valid_transaction_id_becomes_a_message_id() -> None:
    assert message_id("tx-2026-12-01-000042") == "tx-2026-12-01-000042"
    assert message_id("a/b+c=d@e:f.g_h") == "a/b+c=d@e:f.g_h"
    # A shed call is answered before validation: its id may be anything.
    assert message_id("") is None
    assert message_id("x\r\nNats-Expected-Stream: OTHER") is None
    assert message_id("x" * 65) is None
