"""Unit tests for the evaluation metrics and the first-policy choice used by training."""

from __future__ import annotations

import numpy as np
import pytest

from training.datasets import average_precision, recall_at_fpr, roc_auc
from training.evaluation import EvalSet, cascade_scores, pick_policy


def test_perfect_and_inverted_ranking() -> None:
    scores = np.array([0.9, 0.8, 0.3, 0.2, 0.1], dtype=np.float32)
    labels = np.array([1, 1, 0, 0, 0], dtype=np.int8)
    assert roc_auc(scores, labels) == pytest.approx(1.0)
    assert average_precision(scores, labels) == pytest.approx(1.0)
    assert recall_at_fpr(scores, labels, 0.0) == pytest.approx(1.0)
    assert roc_auc(-scores, labels) == pytest.approx(0.0)


def test_hand_computed_values() -> None:
    # ranking: P N P N N  -> precision at the positives 1/1 and 2/3
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5], dtype=np.float32)
    labels = np.array([1, 0, 1, 0, 0], dtype=np.int8)
    assert average_precision(scores, labels) == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)
    assert roc_auc(scores, labels) == pytest.approx(5 / 6)
    assert recall_at_fpr(scores, labels, 0.0) == pytest.approx(0.5)
    assert recall_at_fpr(scores, labels, 1 / 3) == pytest.approx(1.0)


def test_ties_are_not_split() -> None:
    scores = np.array([0.5, 0.5, 0.5, 0.1], dtype=np.float32)
    labels = np.array([1, 0, 0, 0], dtype=np.int8)
    # the only cut above the tie flags nothing; through it, 2 of 3 negatives
    assert recall_at_fpr(scores, labels, 0.5) == 0.0
    assert roc_auc(scores, labels) == pytest.approx((0.5 * 2 + 1) / 3)


def test_weights_stand_for_unsampled_negatives() -> None:
    scores = np.array([0.9, 0.8, 0.1], dtype=np.float32)
    labels = np.array([1, 0, 0], dtype=np.int8)
    # one high-scoring negative standing for 1, one low for 999: flagging it costs 0.1% FPR
    weights = np.array([1.0, 1.0, 999.0])
    assert recall_at_fpr(scores, labels, 0.001, weights) == pytest.approx(1.0)
    assert recall_at_fpr(scores, labels, 0.001) == pytest.approx(1.0)
    assert recall_at_fpr(scores, labels, 0.4) == pytest.approx(1.0)
    assert average_precision(scores, labels, np.array([1.0, 3.0, 1.0])) == pytest.approx(1.0)
    assert roc_auc(scores, labels, weights) == pytest.approx(1.0)


def test_cascade_scores_take_stage2_only_inside_the_band() -> None:
    s1 = np.array([0.01, 0.2, 0.5, 0.95], dtype=np.float32)
    s2 = np.array([0.9, 0.9, 0.0, 0.0], dtype=np.float32)
    assert list(cascade_scores(s1, s2, 0.1, 0.9)) == pytest.approx([0.01, 0.9, 0.0, 0.95])


def test_pick_policy_escalates_the_requested_share() -> None:
    rng = np.random.default_rng(0)
    n = 20_000
    labels = (rng.random(n) < 0.01).astype(np.int8)
    stage1 = np.clip(rng.normal(0.1, 0.05, n) + 0.3 * labels, 0, 1).astype(np.float32)
    stage2 = np.clip(rng.normal(0.05, 0.05, n) + 0.6 * labels, 0, 1).astype(np.float32)
    held_out = EvalSet(
        stage1_all=stage1,
        labels_all=labels,
        patterns_all=np.array([""] * n),
        sample_index=np.arange(n, dtype=np.int64),
        sample_weight=np.ones(n),
        sequences=None,
        stage2=stage2,
    )
    policy = pick_policy(held_out, 0.08, "policy-t")
    assert np.mean(stage1 >= policy.escalate_low) == pytest.approx(0.08, abs=0.002)
    assert policy.escalate_low <= policy.review_threshold <= policy.decline_threshold
    final = cascade_scores(stage1, stage2, policy.escalate_low)
    genuine = labels == 0
    assert np.mean(final[genuine] >= policy.review_threshold) <= 0.0105
    assert np.mean(final[genuine] >= policy.decline_threshold) <= 0.0015
