"""The model registry and decision policy: which artifacts serve, and how scores become answers.

This module owns the schema of ``models/registry.json`` and ``models/policies/<version>.json`` and
their validation. The orchestrator and the workers load them at start-up with
:func:`load_registry` (every artifact's SHA-256 checked, the feature-set version checked against
:data:`cascade.features.FEATURE_SET_VERSION`) and :func:`load_policy`; any problem raises
:class:`RegistryError` naming the offending file, so a bad deployment fails before serving.

Paths inside the registry are relative to the model directory (the folder holding
``registry.json``)::

    {"feature_set": "fs-1", "policy": "policies/policy-1.json",
     "stage1": {"version": "s1-1", "path": "screening/s1-1/model.onnx", "sha256": "..."},
     "stage2": {"version": "s2-1", "triton_model": "fraud_heavy", "triton_version": 1,
                "path": "heavy/s2-1/model.onnx", "sha256": "..."}}
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Final

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from cascade.decision import Decision
from cascade.errors import ConfigurationError
from cascade.features import FEATURE_SET_VERSION

__all__ = [
    "REGISTRY_FILE",
    "Decision",
    "FeaturesUnavailable",
    "Policy",
    "Registry",
    "RegistryError",
    "StageArtifact",
    "load_policy",
    "load_registry",
    "sha256_file",
]

REGISTRY_FILE: Final[str] = "registry.json"


class RegistryError(ConfigurationError, ValueError):
    """The registry, a policy or an artifact is missing, malformed or fails its checksum (a
    :class:`~cascade.errors.ConfigurationError`: a deployment that fails before serving)."""


class StageArtifact(BaseModel):
    """One model artifact: its version, file (relative to the model dir) and checksum."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str = Field(min_length=1, description="Model version, e.g. 's1-1'.")
    path: str = Field(min_length=1, description="ONNX file relative to the model directory.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Hex SHA-256 of the file.")
    triton_model: str | None = Field(None, min_length=1, description="Triton model name.")
    triton_version: int | None = Field(None, ge=1, description="Triton model version directory.")


class Registry(BaseModel):
    """The artifacts that serve together: feature set, policy, stage 1 and stage 2."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    feature_set: str = Field(min_length=1, description="Feature-set version the models read.")
    policy: str = Field(min_length=1, description="Policy file relative to the model directory.")
    stage1: StageArtifact
    stage2: StageArtifact
    _model_dir: Path = PrivateAttr(default=Path())

    @model_validator(mode="after")
    def _stage2_names_triton_model(self) -> Registry:
        if self.stage2.triton_model is None or self.stage2.triton_version is None:
            raise ValueError("stage2 must name triton_model and triton_version")
        return self

    @property
    def model_dir(self) -> Path:
        """The directory the relative paths resolve against."""
        return self._model_dir

    @property
    def stage1_path(self) -> Path:
        """Absolute path of the stage-1 ONNX file."""
        return self._model_dir / self.stage1.path

    @property
    def stage2_path(self) -> Path:
        """Absolute path of the stage-2 ONNX file."""
        return self._model_dir / self.stage2.path

    @property
    def policy_path(self) -> Path:
        """Absolute path of the policy file."""
        return self._model_dir / self.policy


class FeaturesUnavailable(BaseModel):
    """How to decide when the card's history could not be read (Redis slow or down).

    Stage 1 then scores the transaction alone, on an empty history, where the normal thresholds
    (chosen for scores computed *with* history) let almost all fraud through. This section holds
    thresholds measured for that input (``python -m training degraded-report``). With ``escalate``
    true, stage-1 scores in ``[escalate_low, escalate_high)`` also go to stage 2 on a sequence
    holding only the transaction; otherwise stage 1 decides. ``review_threshold: 0`` reviews
    every such answer.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    review_threshold: float = Field(
        ge=0.0, le=1.0, description="Final score for REVIEW without history."
    )
    decline_threshold: float = Field(
        ge=0.0, le=1.0, description="Final score for DECLINE without history."
    )
    escalate: bool = Field(False, description="Whether stage 2 is asked without history.")
    escalate_low: float | None = Field(
        None, ge=0.0, le=1.0, description="Lowest stage-1 score escalated (with escalate only)."
    )
    escalate_high: float | None = Field(
        None, ge=0.0, le=1.0, description="Stage-1 scores at or above this are not escalated."
    )

    @model_validator(mode="after")
    def _consistent(self) -> FeaturesUnavailable:
        if self.review_threshold > self.decline_threshold:
            raise ValueError(
                "features_unavailable.review_threshold must not exceed decline_threshold"
            )
        has_band = (self.escalate_low, self.escalate_high) != (None, None)
        if self.escalate:
            if self.escalate_low is None or self.escalate_high is None:
                raise ValueError(
                    "features_unavailable.escalate is true: escalate_low and escalate_high "
                    "are required"
                )
            if self.escalate_low > self.escalate_high:
                raise ValueError("features_unavailable.escalate_low must not exceed escalate_high")
        elif has_band:
            raise ValueError(
                "features_unavailable.escalate_low/escalate_high are only allowed with "
                "escalate: true"
            )
        return self

    def as_policy(self, version: str) -> Policy:
        """This section as a :class:`Policy` (band empty unless ``escalate``), named ``version``."""
        low, high = (1.0, 1.0)  # [1, 1) holds no score: never escalate
        if self.escalate and self.escalate_low is not None and self.escalate_high is not None:
            low, high = self.escalate_low, self.escalate_high
        return Policy(
            version=version,
            escalate_low=low,
            escalate_high=high,
            review_threshold=self.review_threshold,
            decline_threshold=self.decline_threshold,
        )


class Policy(BaseModel):
    """How scores route and decide.

    Stage-1 scores in ``[escalate_low, escalate_high)`` go to stage 2; the final score is
    DECLINE at or above ``decline_threshold``, REVIEW at or above ``review_threshold``, else
    APPROVE. ``features_unavailable``, when present, replaces all four for answers computed
    without the card's history (:meth:`when_features_unavailable`); a policy without it decides
    those with its normal thresholds, as versions before it did.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str = Field(min_length=1, description="Policy version, e.g. 'policy-1'.")
    escalate_low: float = Field(ge=0.0, le=1.0, description="Lowest stage-1 score escalated.")
    escalate_high: float = Field(
        ge=0.0, le=1.0, description="Stage-1 scores at or above this are not escalated."
    )
    review_threshold: float = Field(ge=0.0, le=1.0, description="Final score for REVIEW.")
    decline_threshold: float = Field(ge=0.0, le=1.0, description="Final score for DECLINE.")
    features_unavailable: FeaturesUnavailable | None = Field(
        None, description="Band and thresholds for answers scored without the card's history."
    )

    @model_validator(mode="after")
    def _ordered(self) -> Policy:
        if self.escalate_low > self.escalate_high:
            raise ValueError("escalate_low must not exceed escalate_high")
        if self.review_threshold > self.decline_threshold:
            raise ValueError("review_threshold must not exceed decline_threshold")
        return self

    def escalates(self, stage1_score: float) -> bool:
        """Whether a stage-1 score falls in the escalation band."""
        return self.escalate_low <= stage1_score < self.escalate_high

    def decide(self, score: float) -> Decision:
        """The answer for a final score."""
        if score >= self.decline_threshold:
            return Decision.DECLINE
        if score >= self.review_threshold:
            return Decision.REVIEW
        return Decision.APPROVE

    def when_features_unavailable(self) -> Policy:
        """The policy that routes and decides when the card's history could not be read: the
        ``features_unavailable`` section (same version), or this policy when it has none."""
        if self.features_unavailable is None:
            return self
        return self.features_unavailable.as_policy(self.version)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_json(path: Path, what: str) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise RegistryError(f"{what} {path} does not exist") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{what} {path} is not readable JSON: {exc}") from exc


def _verify(artifact: StageArtifact, path: Path, stage: str) -> None:
    if not path.is_file():
        raise RegistryError(f"{stage} artifact {path} (version {artifact.version}) is missing")
    actual = sha256_file(path)
    if actual != artifact.sha256:
        raise RegistryError(
            f"{stage} artifact {path} (version {artifact.version}) has sha256 {actual}, "
            f"registry says {artifact.sha256}"
        )


def load_registry(model_dir: Path) -> Registry:
    """Read ``model_dir/registry.json`` and verify every artifact it names.

    Raises :class:`RegistryError` naming the file when the registry is missing or malformed,
    its feature set is not this code's :data:`~cascade.features.FEATURE_SET_VERSION`, or an
    artifact is missing or fails its SHA-256. The policy file must exist (load it with
    :func:`load_policy` on :attr:`Registry.policy_path`).
    """
    path = model_dir / REGISTRY_FILE
    try:
        registry = Registry.model_validate(_read_json(path, "registry"))
    except ValidationError as exc:
        raise RegistryError(f"registry {path} is invalid: {exc}") from exc
    if registry.feature_set != FEATURE_SET_VERSION:
        raise RegistryError(
            f"registry {path} names feature set {registry.feature_set!r}, "
            f"this code computes {FEATURE_SET_VERSION!r}"
        )
    registry._model_dir = model_dir
    _verify(registry.stage1, registry.stage1_path, "stage1")
    _verify(registry.stage2, registry.stage2_path, "stage2")
    if not registry.policy_path.is_file():
        raise RegistryError(f"policy {registry.policy_path} named by {path} is missing")
    return registry


def load_policy(path: Path) -> Policy:
    """Read and validate a policy file; :class:`RegistryError` naming the file on any problem."""
    try:
        return Policy.model_validate(_read_json(path, "policy"))
    except ValidationError as exc:
        raise RegistryError(f"policy {path} is invalid: {exc}") from exc
