"""Decision-level guardrails for stage-2 variants (training.guardrails), on hand-made samples."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from cascade.model_registry import Policy
from training.guardrails import (
    DECISION_CODES,
    GuardrailBounds,
    GuardrailResult,
    cascade_decisions,
    check_variant,
)

POLICY = Policy(
    version="policy-t",
    escalate_low=0.2,
    escalate_high=0.8,
    review_threshold=0.5,
    decline_threshold=0.9,
)


def _sample(n: int = 400, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    stage1 = rng.uniform(0, 1, n).astype(np.float32)
    stage2 = rng.uniform(0, 1, n).astype(np.float32)
    labels = (rng.uniform(0, 1, n) < 0.3).astype(np.int8)
    patterns = np.where(labels == 1, rng.choice(["ato", "card_testing"], n), "").astype(np.str_)
    return {
        "stage1": stage1,
        "baseline": stage2,
        "labels": labels,
        "patterns": patterns,
        "weights": np.ones(n, dtype=np.float64),
    }


def _check(s: dict[str, Any], variant: Any, **bounds: float) -> GuardrailResult:
    return check_variant(
        POLICY,
        variant=variant,
        pr_auc=0.9,
        baseline_pr_auc=0.9,
        bounds=GuardrailBounds(**bounds),
        **s,
    )


def test_decisions_follow_the_policy_row_by_row() -> None:
    s = _sample()
    codes = cascade_decisions(POLICY, s["stage1"], s["baseline"])
    for s1, s2, code in zip(s["stage1"], s["baseline"], codes, strict=True):
        final = s2 if POLICY.escalates(float(s1)) else s1
        assert code == DECISION_CODES[POLICY.decide(float(final))]


def test_an_identical_variant_passes_with_no_flips() -> None:
    s = _sample()
    result = _check(s, s["baseline"].copy())
    assert result.servable
    assert result.flip_rate_escalated == result.flip_rate_all == 0.0
    assert {p.pattern for p in result.patterns} == {"ato", "card_testing"}
    assert all(p.caught == p.baseline_caught for p in result.patterns)


def test_flips_at_the_thresholds_fail_even_with_a_small_score_change() -> None:
    s = _sample()
    variant = s["baseline"].copy()
    # Nudge escalated scores just above the REVIEW threshold to just below it: a tiny change
    # in score, a different answer.
    near = (np.abs(variant - 0.5) < 0.01) & (s["stage1"] >= 0.2) & (s["stage1"] < 0.8)
    assert near.sum() >= 1
    variant[near & (variant >= 0.5)] = 0.4999
    variant[near & (variant < 0.5)] = 0.5
    result = _check(s, variant, max_flip_rate=0.001, recall_margin=1.0)
    assert result.flip_rate_escalated > 0.001
    assert not result.servable
    assert any("escalated decisions flip" in f for f in result.failures)
    assert result.max_abs_score_diff < 0.02


def test_a_lost_pattern_fails_by_name() -> None:
    s = _sample()
    variant = s["baseline"].copy()
    ato = (s["patterns"] == "ato") & (s["stage1"] >= 0.2) & (s["stage1"] < 0.8)
    variant[ato] = 0.0  # every escalated ATO fraud now APPROVEd
    result = _check(s, variant, max_flip_rate=1.0, max_abs_score_diff=1.0)
    assert not result.servable
    assert any(f.startswith("ato: REVIEW-or-DECLINE recall") for f in result.failures)
    assert not any(f.startswith("card_testing") for f in result.failures)


def test_a_large_score_difference_fails_even_where_no_decision_moves() -> None:
    s = _sample()
    variant = s["baseline"].copy()
    outside = np.flatnonzero(s["stage1"] >= 0.8)  # not escalated: stage 2 is not used
    variant[outside[0]] = 1.0 - variant[outside[0]]
    result = _check(s, variant)
    assert result.flip_rate_all == 0.0
    assert any("largest score difference" in f for f in result.failures)


def test_arrays_of_different_lengths_are_refused() -> None:
    s = _sample()
    with pytest.raises(ValueError, match="one entry per sampled transaction"):
        _check(s, s["baseline"][:-1])
