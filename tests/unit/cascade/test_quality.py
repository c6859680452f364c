"""The quality math on streams with known answers: precision and recall at the thresholds,
PR-AUC, label semantics, windows, label delay, and PSI."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cascade.drift import DriftReference, FeatureReference, psi, reference_bins
from cascade.quality import (
    DecisionPoint,
    QualityJoiner,
    VersionKey,
    average_precision,
    format_window,
    parse_window,
    precision_recall,
    report_json,
    report_table,
)
from cascade.v1 import scoring_pb2 as R

V1 = VersionKey("policy-3", "s1-1", "s2-1")
V2 = VersionKey("policy-4", "s1-2", "s2-1")
NOW_MS = 1_800_000_000_000
DAY_MS = 86_400_000
APPROVE, REVIEW, DECLINE = R.DECISION_APPROVE, R.DECISION_REVIEW, R.DECISION_DECLINE


def point(
    tx: str,
    decision: int,
    s1: float | None = 0.5,
    *,
    s2: float | None = None,
    ago_ms: int = 1000,
    versions: VersionKey = V1,
    features: tuple[float, ...] | None = None,
) -> DecisionPoint:
    decided = NOW_MS - ago_ms
    return DecisionPoint(tx, decided, decided - 10, versions, decision, s1, s2, features)


def test_precision_recall_by_hand() -> None:
    flagged = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    fraud = np.array([1, 1, 0, 1, 0, 0], dtype=bool)
    q = precision_recall(flagged, fraud)
    assert (q.true_positives, q.false_positives, q.false_negatives) == (2, 1, 1)
    assert q.precision == pytest.approx(2 / 3)
    assert q.recall == pytest.approx(2 / 3)
    empty = precision_recall(np.zeros(3, dtype=bool), np.zeros(3, dtype=bool))
    assert math.isnan(empty.precision) and math.isnan(empty.recall)


def test_average_precision_by_hand() -> None:
    # Ranked: fraud, genuine, fraud, genuine: AP = (1/1 + 2/3) / 2.
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    fraud = np.array([1, 0, 1, 0], dtype=bool)
    assert average_precision(scores, fraud) == pytest.approx((1 + 2 / 3) / 2)
    # A perfect ranking is 1; no fraud is undefined.
    assert average_precision(np.array([0.9, 0.1]), np.array([1, 0], dtype=bool)) == 1.0
    assert math.isnan(average_precision(scores, np.zeros(4, dtype=bool)))
    # Ties are one threshold: all four tied, half fraud -> precision 0.5 at recall 1.
    assert average_precision(np.full(4, 0.3), fraud) == pytest.approx(0.5)


def test_the_joiner_measures_at_the_policy_thresholds() -> None:
    joiner = QualityJoiner()
    decisions = [
        ("a", DECLINE, 0.95),  # fraud
        ("b", DECLINE, 0.90),  # genuine (labelled)
        ("c", REVIEW, 0.60),  # fraud
        ("d", REVIEW, 0.40),  # unlabelled: presumed genuine
        ("e", APPROVE, 0.30),  # fraud (missed)
        ("f", APPROVE, 0.05),  # unlabelled
    ]
    for tx, decision, s1 in decisions:
        joiner.add_decision(point(tx, decision, s1))
    for tx in ("a", "c", "e"):
        joiner.add_outcome(tx, R.OUTCOME_LABEL_CHARGEBACK, NOW_MS)
    joiner.add_outcome("b", R.OUTCOME_LABEL_GENUINE, NOW_MS)

    (window,) = joiner.report(NOW_MS, [3600]).windows
    (q,) = window.versions
    assert (q.decisions, q.labelled, q.fraud, q.genuine_labelled) == (6, 4, 3, 1)
    assert q.labelled_share == pytest.approx(4 / 6)
    assert q.decline.precision == pytest.approx(1 / 2)
    assert q.decline.recall == pytest.approx(1 / 3)
    # REVIEW flags REVIEW and DECLINE: a, b, c, d -> 2 fraud of 4; 2 of 3 fraud caught.
    assert q.review.precision == pytest.approx(2 / 4)
    assert q.review.recall == pytest.approx(2 / 3)
    # Ranked by stage 1: a(F) b c(F) d e(F) f -> AP = (1 + 2/3 + 3/5) / 3.
    assert q.stage1_pr_auc == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)

    excluded = QualityJoiner(unlabelled="exclude")
    for tx, decision, s1 in decisions:
        excluded.add_decision(point(tx, decision, s1))
    for tx in ("a", "c", "e"):
        excluded.add_outcome(tx, R.OUTCOME_LABEL_CONFIRMED_FRAUD, NOW_MS)
    excluded.add_outcome("b", R.OUTCOME_LABEL_GENUINE, NOW_MS)
    (q,) = excluded.report(NOW_MS, [3600]).windows[0].versions
    # Without d: REVIEW flags a, b, c -> 2 of 3.
    assert q.review.precision == pytest.approx(2 / 3)


def test_a_fraud_label_wins_and_duplicates_count_once() -> None:
    joiner = QualityJoiner()
    joiner.add_decision(point("a", APPROVE, 0.2))
    joiner.add_decision(point("a", DECLINE, 0.9))  # a second record of the id: the first wins
    joiner.add_outcome("a", R.OUTCOME_LABEL_GENUINE, NOW_MS - 5 * DAY_MS)
    joiner.add_outcome("a", R.OUTCOME_LABEL_CHARGEBACK, NOW_MS)
    joiner.add_outcome("a", R.OUTCOME_LABEL_CHARGEBACK, NOW_MS)
    (q,) = joiner.report(NOW_MS, [86400]).windows[0].versions
    assert (q.decisions, q.fraud, q.genuine_labelled) == (1, 1, 0)
    assert q.decline.recall == 0.0 and q.review.recall == 0.0


def test_windows_split_by_decision_time_and_versions() -> None:
    joiner = QualityJoiner()
    joiner.add_decision(point("new", DECLINE, ago_ms=10 * 60_000))
    joiner.add_decision(point("day-old", DECLINE, ago_ms=20 * 3_600_000))
    joiner.add_decision(point("week-old", DECLINE, ago_ms=6 * DAY_MS))
    joiner.add_decision(point("too-old", DECLINE, ago_ms=8 * DAY_MS))
    joiner.add_decision(point("other", APPROVE, ago_ms=60_000, versions=V2))
    report = joiner.report(NOW_MS, [3600, 86400, 604800])
    counts = [{q.versions: q.decisions for q in w.versions} for w in report.windows]
    assert counts == [{V1: 1, V2: 1}, {V1: 2, V2: 1}, {V1: 3, V2: 1}]
    assert [w.window for w in report.windows] == ["1h", "1d", "7d"]
    assert joiner.evict_before(NOW_MS - 7 * DAY_MS) == 1


def test_label_delay_from_the_transaction_time() -> None:
    joiner = QualityJoiner()
    for i, days in enumerate((1, 2, 3, 20)):
        joiner.add_decision(point(f"t{i}", APPROVE))
        joiner.add_outcome(f"t{i}", R.OUTCOME_LABEL_CHARGEBACK, NOW_MS - 1010 + days * DAY_MS)
    (q,) = joiner.report(NOW_MS, [3600]).windows[0].versions
    assert q.label_delay_s["count"] == 4
    assert q.label_delay_s["p50"] == pytest.approx(2.5 * 86400)
    assert q.label_delay_s["max"] == pytest.approx(20 * 86400)


def test_stage2_pr_auc_only_over_what_stage2_scored() -> None:
    joiner = QualityJoiner()
    joiner.add_decision(point("a", DECLINE, 0.1, s2=0.9))
    joiner.add_decision(point("b", REVIEW, 0.9, s2=0.2))
    joiner.add_decision(point("c", APPROVE, 0.95))  # not escalated
    joiner.add_outcome("a", R.OUTCOME_LABEL_CHARGEBACK, NOW_MS)
    (q,) = joiner.report(NOW_MS, [3600]).windows[0].versions
    assert q.stage2_scored == 2
    assert q.stage2_pr_auc == 1.0
    assert q.stage1_pr_auc == pytest.approx(1 / 3)


def test_report_json_has_no_nan_and_the_table_names_versions() -> None:
    joiner = QualityJoiner()
    joiner.add_decision(point("a", APPROVE, 0.1))
    report = joiner.report(NOW_MS, [3600])
    data = report_json(report)
    assert data["windows"][0]["versions"][0]["decline"]["precision"] is None
    assert any("policy-3 / s1-1 / s2-1" in line for line in report_table(report))


def test_windows_parse() -> None:
    assert [parse_window(w) for w in ("90s", "15m", "1h", "24h", "7d")] == [
        90,
        900,
        3600,
        86400,
        604800,
    ]
    assert format_window(86400) == "1d" and format_window(90) == "90s"
    for bad in ("", "7", "0h", "-1d", "1w"):
        with pytest.raises(ValueError, match="is not a window"):
            parse_window(bad)


def test_psi_of_identical_distributions_is_about_zero_and_of_shifted_ones_large() -> None:
    rng = np.random.default_rng(0)
    reference = reference_bins(rng.normal(0, 1, 50_000))
    assert len(reference.proportions) == 10
    assert psi(reference, rng.normal(0, 1, 50_000)) < 0.01
    assert psi(reference, rng.normal(1, 1, 50_000)) > 0.2
    assert psi(reference, rng.normal(0, 2, 50_000)) > 0.2
    assert math.isnan(psi(reference, np.array([])))


def test_psi_by_hand_and_discrete_bins() -> None:
    binary = reference_bins(np.array([0.0] * 80 + [1.0] * 20))
    assert binary.edges == [1.0] and binary.proportions == pytest.approx([0.8, 0.2])
    shifted = np.array([0.0] * 50 + [1.0] * 50)
    expected = (0.5 - 0.8) * math.log(0.5 / 0.8) + (0.5 - 0.2) * math.log(0.5 / 0.2)
    assert psi(binary, shifted) == pytest.approx(expected)
    # A rare flag still gets its own bin (deciles alone would put it with the zeros).
    rare = reference_bins(np.array([0.0] * 97 + [1.0] * 3))
    assert rare.edges == [1.0] and rare.proportions == pytest.approx([0.97, 0.03])


def test_drift_per_version_with_a_reference() -> None:
    rng = np.random.default_rng(1)
    train_score = rng.beta(1, 20, 20_000)
    train_feature = rng.normal(0, 1, 20_000)
    reference = DriftReference(
        stage1_version="s1-1",
        feature_set="fs-1",
        rows=20_000,
        source={},
        score=reference_bins(train_score),
        features=[
            FeatureReference(
                name="amount_log", index=3, importance=0.1, bins=reference_bins(train_feature)
            )
        ],
    )
    joiner = QualityJoiner(references={"s1-1": reference})
    for i, (s, f) in enumerate(zip(rng.beta(1, 20, 5000), rng.normal(2, 1, 5000), strict=True)):
        joiner.add_decision(point(f"t{i}", APPROVE, float(s), features=(float(f),)))
    (q,) = joiner.report(NOW_MS, [3600]).windows[0].versions
    assert q.drift is not None
    assert q.drift.score_psi < 0.05
    assert q.drift.feature_psi["amount_log"] > 0.2


def test_the_gauges_of_a_report_leave_out_undefined_values() -> None:
    from cascade.quality_job import QualityCollector, report_metrics

    joiner = QualityJoiner()
    joiner.add_decision(point("a", DECLINE, 0.9))
    joiner.add_decision(point("b", APPROVE, 0.1))
    joiner.add_outcome("a", R.OUTCOME_LABEL_CHARGEBACK, NOW_MS)
    report = joiner.report(NOW_MS, [3600])
    samples = {
        (m.name, tuple(sorted(s.labels.items()))): s.value
        for m in report_metrics(report)
        for s in m.samples
    }
    base = (("policy", "policy-3"), ("stage1", "s1-1"), ("stage2", "s2-1"), ("window", "1h"))
    key = tuple(sorted((*base, ("threshold", "DECLINE"))))
    assert samples[("cascade_quality_precision", key)] == 1.0
    assert samples[("cascade_quality_recall", key)] == 1.0
    assert samples[("cascade_quality_decisions", base)] == 2
    # No stage-2 scores: that PR-AUC is undefined and not exported.
    assert ("cascade_quality_pr_auc", tuple(sorted((*base, ("stage", "stage2"))))) not in samples
    collector = QualityCollector()
    assert list(collector.collect()) == []
    collector.report = report
    assert {m.name for m in collector.collect()} >= {
        "cascade_quality_precision",
        "cascade_drift_psi",
    }
