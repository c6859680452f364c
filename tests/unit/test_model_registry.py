"""Unit tests for cascade.model_registry: schema, checksums, policy validation and decisions."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import pytest

from cascade.model_registry import (
    FeaturesUnavailable,
    Policy,
    RegistryError,
    load_policy,
    load_registry,
    sha256_file,
)
from cascade.settings import DEFAULT_MODEL_DIR

if TYPE_CHECKING:
    from pathlib import Path


def write_model_dir(root: Path, **overrides: Any) -> dict[str, Any]:
    (root / "screening/s1-9").mkdir(parents=True)
    (root / "heavy/s2-9").mkdir(parents=True)
    (root / "policies").mkdir()
    (root / "screening/s1-9/model.onnx").write_bytes(b"stage one")
    (root / "heavy/s2-9/model.onnx").write_bytes(b"stage two")
    (root / "policies/policy-9.json").write_text(
        json.dumps(
            {
                "version": "policy-9",
                "escalate_low": 0.1,
                "escalate_high": 0.9,
                "review_threshold": 0.5,
                "decline_threshold": 0.8,
            }
        )
    )
    doc: dict[str, Any] = {
        "feature_set": "fs-1",
        "policy": "policies/policy-9.json",
        "stage1": {
            "version": "s1-9",
            "path": "screening/s1-9/model.onnx",
            "sha256": hashlib.sha256(b"stage one").hexdigest(),
        },
        "stage2": {
            "version": "s2-9",
            "triton_model": "fraud_heavy",
            "triton_version": 3,
            "path": "heavy/s2-9/model.onnx",
            "sha256": hashlib.sha256(b"stage two").hexdigest(),
        },
    }
    doc.update(overrides)
    (root / "registry.json").write_text(json.dumps(doc))
    return doc


def test_load_registry_resolves_and_verifies(tmp_path: Path) -> None:
    write_model_dir(tmp_path)
    registry = load_registry(tmp_path)
    assert registry.stage1.version == "s1-9"
    assert registry.stage2.triton_model == "fraud_heavy"
    assert registry.stage2.triton_version == 3
    assert registry.stage1_path.read_bytes() == b"stage one"
    assert registry.stage2_path == tmp_path / "heavy/s2-9/model.onnx"
    assert load_policy(registry.policy_path).version == "policy-9"


def test_checksum_mismatch_names_the_file(tmp_path: Path) -> None:
    write_model_dir(tmp_path)
    (tmp_path / "heavy/s2-9/model.onnx").write_bytes(b"tampered")
    with pytest.raises(RegistryError, match=r"stage2 artifact .*heavy/s2-9/model\.onnx.*sha256"):
        load_registry(tmp_path)


def test_missing_artifact_names_the_file(tmp_path: Path) -> None:
    write_model_dir(tmp_path)
    (tmp_path / "screening/s1-9/model.onnx").unlink()
    with pytest.raises(RegistryError, match=r"screening/s1-9/model\.onnx.*missing"):
        load_registry(tmp_path)


def test_missing_registry_and_policy(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=r"registry\.json does not exist"):
        load_registry(tmp_path)
    write_model_dir(tmp_path)
    (tmp_path / "policies/policy-9.json").unlink()
    with pytest.raises(RegistryError, match=r"policy-9\.json.*missing"):
        load_registry(tmp_path)


def test_wrong_feature_set_is_refused(tmp_path: Path) -> None:
    write_model_dir(tmp_path, feature_set="fs-0")
    with pytest.raises(RegistryError, match="feature set 'fs-0'"):
        load_registry(tmp_path)


@pytest.mark.parametrize(
    "overrides",
    [
        {"stage2": {"version": "s2", "path": "x", "sha256": "0" * 64}},  # no triton model
        {"stage1": {"version": "s1", "path": "x", "sha256": "not-hex"}},
        {"unexpected": 1},
    ],
)
def test_malformed_registry(tmp_path: Path, overrides: dict[str, Any]) -> None:
    write_model_dir(tmp_path, **overrides)
    with pytest.raises(RegistryError, match=r"registry .* is invalid"):
        load_registry(tmp_path)


def test_not_json(tmp_path: Path) -> None:
    (tmp_path / "registry.json").write_text("{nope")
    with pytest.raises(RegistryError, match="not readable JSON"):
        load_registry(tmp_path)


@pytest.mark.parametrize(
    ("low", "high", "review", "decline"),
    [(0.6, 0.5, 0.5, 0.9), (0.1, 0.5, 0.9, 0.5), (-0.1, 0.5, 0.5, 0.9), (0.1, 1.5, 0.5, 0.9)],
)
def test_policy_validation(
    tmp_path: Path, low: float, high: float, review: float, decline: float
) -> None:
    path = tmp_path / "p.json"
    doc = {
        "version": "p",
        "escalate_low": low,
        "escalate_high": high,
        "review_threshold": review,
        "decline_threshold": decline,
    }
    path.write_text(json.dumps(doc))
    with pytest.raises(RegistryError, match=r"policy .*p\.json is invalid"):
        load_policy(path)


def test_policy_routes_and_decides() -> None:
    policy = Policy(
        version="p",
        escalate_low=0.1,
        escalate_high=0.6,
        review_threshold=0.5,
        decline_threshold=0.8,
    )
    assert not policy.escalates(0.09)
    assert policy.escalates(0.1)
    assert policy.escalates(0.59)
    assert not policy.escalates(0.6)
    assert policy.decide(0.2) == "APPROVE"
    assert policy.decide(0.5) == "REVIEW"
    assert policy.decide(0.8) == "DECLINE"


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 3_000_000)
    assert sha256_file(path) == hashlib.sha256(b"x" * 3_000_000).hexdigest()


def test_committed_registry_loads() -> None:
    if not (DEFAULT_MODEL_DIR / "registry.json").exists():
        pytest.skip("no committed models yet")
    registry = load_registry(DEFAULT_MODEL_DIR)
    policy = load_policy(registry.policy_path)
    assert policy.escalate_low < policy.escalate_high
    assert registry.stage1_path.stat().st_size < 5_000_000
    assert registry.stage2_path.stat().st_size < 5_000_000


def _policy_doc(**section: Any) -> dict[str, Any]:
    return {
        "version": "p",
        "escalate_low": 0.1,
        "escalate_high": 0.9,
        "review_threshold": 0.5,
        "decline_threshold": 0.8,
        "features_unavailable": section,
    }


def test_features_unavailable_section_loads_and_decides(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_policy_doc(review_threshold=0.01, decline_threshold=0.2)))
    policy = load_policy(path)
    assert policy.features_unavailable == FeaturesUnavailable(
        review_threshold=0.01, decline_threshold=0.2, escalate=False
    )
    degraded = policy.when_features_unavailable()
    assert degraded.version == "p"
    assert not degraded.escalates(0.5) and not degraded.escalates(1.0)  # escalate is off
    assert [degraded.decide(s) for s in (0.005, 0.01, 0.2)] == ["APPROVE", "REVIEW", "DECLINE"]
    assert policy.decide(0.2) == "APPROVE"  # the normal thresholds are untouched


def test_features_unavailable_section_can_escalate() -> None:
    section = FeaturesUnavailable(
        review_threshold=0.0, decline_threshold=0.9, escalate=True, escalate_low=0.3,
        escalate_high=0.6,
    )  # fmt: skip
    degraded = section.as_policy("p")
    assert degraded.escalates(0.3) and not degraded.escalates(0.6)
    assert degraded.decide(0.0) == "REVIEW"  # review_threshold 0: every answer at least REVIEW


def test_policy_without_section_decides_the_same_without_features() -> None:
    policy = Policy(
        version="p", escalate_low=0.1, escalate_high=0.6, review_threshold=0.5,
        decline_threshold=0.8,
    )  # fmt: skip
    assert policy.features_unavailable is None
    assert policy.when_features_unavailable() is policy


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"review_threshold": 0.3, "decline_threshold": 0.2}, "review_threshold must not exceed"),
        ({"review_threshold": 0.1, "decline_threshold": 1.2}, "less than or equal to 1"),
        ({"decline_threshold": 0.2}, "review_threshold\n  Field required"),
        (
            {"review_threshold": 0.1, "decline_threshold": 0.2, "escalate": True},
            "escalate is true: escalate_low and escalate_high are required",
        ),
        (
            {"review_threshold": 0.1, "decline_threshold": 0.2, "escalate_low": 0.1},
            "only allowed with escalate: true",
        ),
        (
            {
                "review_threshold": 0.1,
                "decline_threshold": 0.2,
                "escalate": True,
                "escalate_low": 0.5,
                "escalate_high": 0.4,
            },
            "escalate_low must not exceed escalate_high",
        ),
        ({"review_threshold": 0.1, "decline_threshold": 0.2, "mode": "x"}, "Extra inputs"),
    ],
)
def test_features_unavailable_validation_names_the_problem(
    tmp_path: Path, section: dict[str, Any], message: str
) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_policy_doc(**section)))
    with pytest.raises(RegistryError, match=r"policy .*p\.json is invalid") as caught:
        load_policy(path)
    assert "features_unavailable" in str(caught.value)
    assert message in str(caught.value)


def test_committed_policies_keep_their_meaning() -> None:
    """Every committed policy loads; a version never changes meaning, so the sections come as
    new versions: the active policy is a trained one's thresholds (no section) plus the
    features-unavailable section, and it says where its thresholds were calibrated."""
    policies = {p.name: load_policy(p) for p in (DEFAULT_MODEL_DIR / "policies").glob("*.json")}
    assert {p.version for p in policies.values()} == {n.removesuffix(".json") for n in policies}
    assert policies["policy-1.json"].features_unavailable is None
    active = load_policy(load_registry(DEFAULT_MODEL_DIR).policy_path)
    assert active.features_unavailable is not None
    assert active.calibrated_on is not None and "days" in active.calibrated_on
    base = active.model_copy(update={"features_unavailable": None})
    assert any(
        p.features_unavailable is None and p == base.model_copy(update={"version": p.version})
        for p in policies.values()
    ), "the active thresholds are no trained policy's"
