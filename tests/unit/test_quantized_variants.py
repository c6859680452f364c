"""Accuracy guardrail for the stage-2 INT8 / FP16 variants listed in models/heavy/variants.json.

Every variant keeps the tensor contract; every variant marked ``servable`` must lose at most the
manifest's PR-AUC margin against the FP32 model, measured here on a fresh simulated stream (a seed
the models never saw), weighted back to the real traffic mix.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from cascade.features import SEQUENCE_LEN, TOKEN_DIM
from cascade.model_registry import Registry, load_policy, load_registry, sha256_file
from cascade.settings import DEFAULT_MODEL_DIR
from training.datasets import average_precision, replay_screening
from training.evaluation import EvalSet, build_eval_set, stage1_scores, stage2_scores
from training.guardrails import GuardrailBounds, check_variant
from training.simulator import SimulationConfig, simulate

MANIFEST = DEFAULT_MODEL_DIR / "heavy" / "variants.json"

pytestmark = pytest.mark.skipif(not MANIFEST.exists(), reason="no stage-2 variants shipped")


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(MANIFEST.read_text())
    return doc


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="module")
def eval_set(registry: Registry) -> EvalSet:
    records = simulate(SimulationConfig(seed=4242, n_cards=2000, n_days=40))
    data = replay_screening(records)
    s1 = stage1_scores(registry.stage1_path, data.features)
    window = np.flatnonzero(data.day >= 14).astype(np.int64)
    result = build_eval_set(records, data, s1, window, negatives_per_stratum=3000, seed=1)
    assert result.sequences is not None
    result.stage2 = stage2_scores(registry.stage2_path, result.sequences)
    return result


def test_manifest_matches_the_served_model(manifest: dict[str, Any], registry: Registry) -> None:
    assert manifest["baseline"] == registry.stage2.version
    assert manifest["baseline_sha256"] == registry.stage2.sha256
    assert 0 < manifest["pr_auc_margin"] <= 0.05
    assert {v["precision"] for v in manifest["variants"]} == {"int8", "fp16"}
    for variant in manifest["variants"]:
        assert sha256_file(DEFAULT_MODEL_DIR / variant["path"]) == variant["sha256"]


def test_variants_keep_the_tensor_contract(manifest: dict[str, Any], eval_set: EvalSet) -> None:
    assert eval_set.sequences is not None
    for variant in manifest["variants"]:
        session = ort.InferenceSession(
            str(DEFAULT_MODEL_DIR / variant["path"]), providers=["CPUExecutionProvider"]
        )
        (inp,) = session.get_inputs()
        assert inp.name == "sequence"
        assert inp.type == "tensor(float)"
        assert list(inp.shape[1:]) == [SEQUENCE_LEN, TOKEN_DIM]
        for batch in (1, 32):
            (score,) = session.run(["score"], {"sequence": eval_set.sequences[:batch]})
            assert score.shape == (batch, 1)
            assert score.dtype == np.float32
            assert ((score >= 0) & (score <= 1)).all()


def test_servable_variants_stay_within_the_pr_auc_margin(
    manifest: dict[str, Any], eval_set: EvalSet
) -> None:
    assert eval_set.sequences is not None
    assert eval_set.stage2 is not None
    labels, weights = eval_set.labels, eval_set.sample_weight
    assert labels.sum() >= 100  # enough fraud for a meaningful PR-AUC
    baseline = average_precision(eval_set.stage2, labels, weights)
    assert baseline > 0.5
    servable = [v for v in manifest["variants"] if v["servable"]]
    assert servable, "no variant is marked servable"
    for variant in servable:
        scores = stage2_scores(DEFAULT_MODEL_DIR / variant["path"], eval_set.sequences)
        loss = baseline - average_precision(scores, labels, weights)
        assert loss <= manifest["pr_auc_margin"], (
            f"{variant['version']} loses {loss:.4f} PR-AUC (margin {manifest['pr_auc_margin']})"
        )


def test_servable_variants_keep_the_policys_decisions_and_every_patterns_recall(
    manifest: dict[str, Any], eval_set: EvalSet, registry: Registry
) -> None:
    """Not only PR-AUC: the answers at the served policy's thresholds, per fraud pattern."""
    assert eval_set.sequences is not None
    assert eval_set.stage2 is not None
    policy = load_policy(registry.policy_path)
    assert manifest["policy"] == policy.version
    bounds = GuardrailBounds(
        pr_auc_margin=manifest["pr_auc_margin"],
        max_flip_rate=manifest["max_flip_rate"],
        recall_margin=manifest["recall_margin"],
        max_abs_score_diff=manifest["max_abs_score_diff"],
    )
    assert bounds.max_flip_rate <= 0.01
    assert bounds.recall_margin <= 0.02
    labels, weights = eval_set.labels, eval_set.sample_weight
    baseline_pr_auc = average_precision(eval_set.stage2, labels, weights)
    for variant in (v for v in manifest["variants"] if v["servable"]):
        scores = stage2_scores(DEFAULT_MODEL_DIR / variant["path"], eval_set.sequences)
        result = check_variant(
            policy,
            stage1=eval_set.stage1,
            baseline=eval_set.stage2,
            variant=scores,
            labels=labels,
            patterns=eval_set.patterns,
            weights=weights,
            pr_auc=average_precision(scores, labels, weights),
            baseline_pr_auc=baseline_pr_auc,
            bounds=bounds,
        )
        assert len(result.patterns) >= 3, "the stream should hold several fraud patterns"
        assert result.servable, f"{variant['version']}: {result.failures}"
