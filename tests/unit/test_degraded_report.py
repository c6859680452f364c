"""The degraded-policy measurement: threshold picking and vectorised decisions (no models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cascade.model_registry import FeaturesUnavailable
from training.degraded import (
    APPROVE,
    DECLINE,
    REVIEW,
    Window,
    _floor_threshold,
    decisions,
    outcome,
)


def window(scores: list[float], patterns: list[str]) -> Window:
    return Window(
        records=[],
        labels=np.array([p != "" for p in patterns], dtype=np.int8),
        patterns=np.array(patterns, dtype=np.str_),
        stage1_empty=np.array(scores, dtype=np.float64),
    )


def test_floor_threshold_keeps_the_floor_on_every_pattern() -> None:
    rng = np.random.default_rng(3)
    patterns = ["card_testing"] * 200 + ["impossible_travel"] * 100 + [""] * 1000
    scores = np.r_[rng.uniform(0.5, 1.0, 200), rng.uniform(0.0, 0.4, 100), rng.uniform(0, 1, 1000)]
    w = window(scores.tolist(), patterns)
    cut = _floor_threshold(w.stage1_empty, w, 0.99)
    for pattern in ("card_testing", "impossible_travel"):
        assert np.mean(scores[w.patterns == pattern] >= cut) >= 0.99
    # The weakest pattern sets the cut: one step higher loses it.
    assert np.mean(scores[w.patterns == "impossible_travel"] >= cut * 1.01) < 0.99


def test_decisions_match_the_served_policy() -> None:
    section = FeaturesUnavailable(review_threshold=0.2, decline_threshold=0.7)
    scores = [0.0, 0.1999, 0.2, 0.5, 0.7, 0.99]
    w = window(scores, [""] * len(scores))
    answers = decisions(w, Path("unused.onnx"), section)
    served = section.as_policy("x")
    codes = {"APPROVE": APPROVE, "REVIEW": REVIEW, "DECLINE": DECLINE}
    assert answers.tolist() == [codes[served.decide(s)] for s in scores]
    assert decisions(w, Path("unused.onnx"), None).tolist() == [REVIEW] * len(scores)


def test_outcome_shares() -> None:
    w = window([0.9, 0.3, 0.0, 0.5, 0.0], ["card_testing", "card_testing", "", "", ""])
    answers = np.array([DECLINE, REVIEW, APPROVE, REVIEW, DECLINE], dtype=np.int8)
    m = outcome(answers, w, 0.0)
    assert m.recall == {"all": 1.0, "card_testing": 1.0}
    assert m.recall_decline["card_testing"] == 0.5
    assert m.genuine_review == pytest.approx(1 / 3) and m.genuine_decline == pytest.approx(1 / 3)
