"""The calibration command: a new, immutable policy version for a target escalation rate."""

from __future__ import annotations

import json
import shutil
from typing import TYPE_CHECKING

import pytest

from cascade.model_registry import load_policy, load_registry
from cascade.settings import DEFAULT_MODEL_DIR
from training.report import EvalConfig, calibrate
from training.simulator import SimulationConfig

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL_DIR / "registry.json").exists(), reason="no committed models"
)

SMALL = EvalConfig(
    SimulationConfig(seed=31, n_cards=1000, n_days=35), first_day=14, negatives_per_stratum=2000
)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    target = tmp_path / "models"
    shutil.copytree(
        DEFAULT_MODEL_DIR, target, ignore=shutil.ignore_patterns("*-int8", "*-fp16", "*.md")
    )
    return target


def test_calibrate_writes_a_new_policy_without_activating_it(model_dir: Path) -> None:
    registry_before = (model_dir / "registry.json").read_text()
    result = calibrate(model_dir, 0.05, "policy-test", SMALL)
    assert result.path == model_dir / "policies" / "policy-test.json"
    policy = load_policy(result.path)
    assert policy == result.policy
    assert policy.version == "policy-test"
    assert policy.escalate_low <= policy.review_threshold <= policy.decline_threshold
    assert result.escalated_share == pytest.approx(0.05, abs=0.005)
    assert result.review_fpr <= 0.0105
    assert result.decline_fpr <= 0.0015
    assert result.recall_review >= result.recall_decline > 0.5
    active = load_policy(load_registry(model_dir).policy_path)
    assert policy.features_unavailable == active.features_unavailable  # carried forward
    assert (
        policy.calibrated_on
        == "simulator sim-3 seed 31, 1000 cards, days 14-34 (a stream of its own)"
    )
    assert (model_dir / "registry.json").read_text() == registry_before
    with pytest.raises(FileExistsError, match="immutable"):
        calibrate(model_dir, 0.05, "policy-test", SMALL)


def test_calibrate_can_activate(model_dir: Path) -> None:
    narrow = calibrate(model_dir, 0.02, "policy-narrow", SMALL).policy
    calibrate(model_dir, 0.10, "policy-wide", SMALL, activate=True)
    doc = json.loads((model_dir / "registry.json").read_text())
    assert doc["policy"] == "policies/policy-wide.json"
    registry = load_registry(model_dir)
    wide = load_policy(registry.policy_path)
    assert wide.version == "policy-wide"
    assert wide.escalate_low < narrow.escalate_low  # 10% escalation reaches lower scores
