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

The registry may hold more than the champion (the top-level fields, as above): a ``candidate``
naming a new ``stage1``, ``stage2`` and/or ``policy`` (what it leaves out is the champion's),
served in shadow or to a canary share of cards, and ``previous``, the champion before the last
promotion, which a rollback restores (:func:`promoted`, :func:`rolled_back`,
:func:`write_registry`; ``docs/rollout.md``). Every version a candidate names differs from the
champion's, so cache keys, NATS subjects and Triton versions never mix them up.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from cascade.decision import Decision
from cascade.errors import ConfigurationError
from cascade.features import FEATURE_SET_VERSION

__all__ = [
    "REGISTRY_FILE",
    "Candidate",
    "Decision",
    "FeaturesUnavailable",
    "Policy",
    "Previous",
    "Registry",
    "RegistryError",
    "ServingSet",
    "StageArtifact",
    "load_policy",
    "load_registry",
    "promoted",
    "rolled_back",
    "sha256_file",
    "verify_registry",
    "write_registry",
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


def _check_stage2(artifact: StageArtifact, where: str) -> None:
    if artifact.triton_model is None or artifact.triton_version is None:
        raise ValueError(f"{where} must name triton_model and triton_version")


class Candidate(BaseModel):
    """What a rollout tries: any of a new stage 1, stage 2 and policy (the rest is the
    champion's)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    policy: str | None = Field(None, min_length=1, description="Candidate policy file.")
    stage1: StageArtifact | None = Field(None, description="Candidate stage-1 model.")
    stage2: StageArtifact | None = Field(None, description="Candidate stage-2 model.")
    canary_share: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Share of cards the candidate scores on the live path, followed live like "
        "the rest of the file; None: the process setting rollout.canary_share.",
    )

    @model_validator(mode="after")
    def _names_something(self) -> Candidate:
        if self.policy is None and self.stage1 is None and self.stage2 is None:
            raise ValueError("candidate must name at least one of stage1, stage2, policy")
        if self.stage2 is not None:
            _check_stage2(self.stage2, "candidate.stage2")
        return self


class Previous(BaseModel):
    """The champion before the last promotion (what :func:`rolled_back` restores)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    policy: str = Field(min_length=1, description="Policy file of the previous champion.")
    stage1: StageArtifact
    stage2: StageArtifact


@dataclass(frozen=True, slots=True)
class ServingSet:
    """One complete set of artifacts that answer together (the champion, or the candidate
    completed with the champion's other parts); paths absolute."""

    role: str
    """``"champion"`` or ``"candidate"``."""
    feature_set: str
    policy_path: Path
    stage1: StageArtifact
    stage2: StageArtifact
    model_dir: Path

    @property
    def stage1_path(self) -> Path:
        """Absolute path of the stage-1 ONNX file."""
        return self.model_dir / self.stage1.path

    @property
    def stage2_path(self) -> Path:
        """Absolute path of the stage-2 ONNX file."""
        return self.model_dir / self.stage2.path


class Registry(BaseModel):
    """The artifacts that serve together: feature set, policy, stage 1 and stage 2 (the
    champion), optionally a ``candidate`` and the ``previous`` champion."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    feature_set: str = Field(min_length=1, description="Feature-set version the models read.")
    policy: str = Field(min_length=1, description="Policy file relative to the model directory.")
    stage1: StageArtifact
    stage2: StageArtifact
    candidate: Candidate | None = Field(None, description="The version(s) being rolled out.")
    previous: Previous | None = Field(None, description="The champion before the last promote.")
    _model_dir: Path = PrivateAttr(default=Path())

    @model_validator(mode="after")
    def _versions_apart(self) -> Registry:
        _check_stage2(self.stage2, "stage2")
        c = self.candidate
        if c is None:
            return self
        if c.stage1 is not None and c.stage1.version == self.stage1.version:
            raise ValueError(
                f"candidate.stage1 version {c.stage1.version!r} is the champion's: a candidate "
                "needs a version of its own (cache keys and subjects name it)"
            )
        if c.stage2 is not None:
            if c.stage2.version == self.stage2.version:
                raise ValueError(
                    f"candidate.stage2 version {c.stage2.version!r} is the champion's: a "
                    "candidate needs a version of its own (cache keys name it)"
                )
            if (c.stage2.triton_model, c.stage2.triton_version) == (
                self.stage2.triton_model,
                self.stage2.triton_version,
            ):
                raise ValueError(
                    "candidate.stage2 names the champion's Triton model and version "
                    f"({c.stage2.triton_model} {c.stage2.triton_version}): give it another "
                    "triton_version"
                )
        if c.policy is not None and c.policy == self.policy:
            raise ValueError(f"candidate.policy {c.policy!r} is the champion's policy file")
        return self

    def champion(self) -> ServingSet:
        """The champion's artifacts."""
        return ServingSet(
            role="champion",
            feature_set=self.feature_set,
            policy_path=self._model_dir / self.policy,
            stage1=self.stage1,
            stage2=self.stage2,
            model_dir=self._model_dir,
        )

    def candidate_set(self) -> ServingSet | None:
        """The candidate completed with the champion's other parts, or None without one."""
        c = self.candidate
        if c is None:
            return None
        return ServingSet(
            role="candidate",
            feature_set=self.feature_set,
            policy_path=self._model_dir / (c.policy or self.policy),
            stage1=c.stage1 or self.stage1,
            stage2=c.stage2 or self.stage2,
            model_dir=self._model_dir,
        )

    def canary_share(self, default: float) -> float:
        """The share of cards the candidate scores: the registry's, else ``default`` (the
        process setting); 0 without a candidate."""
        c = self.candidate
        if c is None:
            return 0.0
        return default if c.canary_share is None else c.canary_share

    def stage1_versions(self, *, with_candidate: bool = True) -> dict[str, StageArtifact]:
        """Every stage-1 version served: the champion's, and the candidate's when asked."""
        out = {self.stage1.version: self.stage1}
        if with_candidate and self.candidate is not None and self.candidate.stage1 is not None:
            out[self.candidate.stage1.version] = self.candidate.stage1
        return out

    def stage2_artifacts(self) -> list[StageArtifact]:
        """Every stage-2 artifact named (champion, candidate, previous), each Triton version
        once: what the Triton model repository must hold for promote and rollback."""
        found = [self.stage2]
        if self.candidate is not None and self.candidate.stage2 is not None:
            found.append(self.candidate.stage2)
        if self.previous is not None:
            found.append(self.previous.stage2)
        out: dict[tuple[str | None, int | None], StageArtifact] = {}
        for artifact in found:
            out.setdefault((artifact.triton_model, artifact.triton_version), artifact)
        return list(out.values())

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
    calibrated_on: str | None = Field(
        None,
        description="Where the thresholds were picked (stream and days): never the window "
        "their quality is reported on.",
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
    return verify_registry(registry, model_dir, path)


def verify_registry(registry: Registry, model_dir: Path, path: Path | None = None) -> Registry:
    """Check ``registry`` against ``model_dir`` as :func:`load_registry` does (feature set,
    every artifact's checksum, policies present and their versions apart); returns it bound to
    ``model_dir``. ``path`` names it in errors (default: ``model_dir/registry.json``)."""
    path = path or model_dir / REGISTRY_FILE
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
    candidate = registry.candidate
    if candidate is not None:
        if candidate.stage1 is not None:
            _verify(candidate.stage1, model_dir / candidate.stage1.path, "candidate.stage1")
        if candidate.stage2 is not None:
            _verify(candidate.stage2, model_dir / candidate.stage2.path, "candidate.stage2")
        if candidate.policy is not None:
            ours = load_policy(registry.policy_path).version
            theirs = load_policy(model_dir / candidate.policy).version
            if ours == theirs:
                raise RegistryError(
                    f"registry {path}: candidate policy {candidate.policy} has the champion's "
                    f"version {ours!r} (cache keys name it: give it a version of its own)"
                )
    return registry


def promoted(registry: Registry) -> Registry:
    """The registry after promoting its candidate: the candidate's parts become the champion's,
    the old champion is kept as ``previous`` (for :func:`rolled_back`), no candidate is left.
    :class:`RegistryError` when there is no candidate."""
    c = registry.candidate
    if c is None:
        raise RegistryError("the registry has no candidate to promote")
    return _with_dir(
        registry.model_copy(
            update={
                "policy": c.policy or registry.policy,
                "stage1": c.stage1 or registry.stage1,
                "stage2": c.stage2 or registry.stage2,
                "candidate": None,
                "previous": Previous(
                    policy=registry.policy, stage1=registry.stage1, stage2=registry.stage2
                ),
            }
        ),
        registry.model_dir,
    )


def rolled_back(registry: Registry) -> Registry:
    """The registry after a rollback: with a candidate, the candidate is dropped (the canary
    ends, every card is the champion's again); without one, the ``previous`` champion is
    restored (undoing the last promotion). :class:`RegistryError` when neither exists."""
    if registry.candidate is not None:
        update: dict[str, object] = {"candidate": None}
    elif registry.previous is not None:
        p = registry.previous
        update = {"policy": p.policy, "stage1": p.stage1, "stage2": p.stage2, "previous": None}
    else:
        raise RegistryError("the registry has neither a candidate nor a previous champion")
    return _with_dir(registry.model_copy(update=update), registry.model_dir)


def _with_dir(registry: Registry, model_dir: Path) -> Registry:
    checked = Registry.model_validate(registry.model_dump())  # the validators run again
    checked._model_dir = model_dir
    return checked


def write_registry(model_dir: Path, registry: Registry) -> Path:
    """Replace ``model_dir/registry.json`` atomically (a temporary file in the same folder,
    flushed to disk, then renamed over it): a reader sees the old file or the new, never half."""
    path = model_dir / REGISTRY_FILE
    text = json.dumps(registry.model_dump(exclude_none=True), indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".registry-", suffix=".json", dir=model_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_policy(path: Path) -> Policy:
    """Read and validate a policy file; :class:`RegistryError` naming the file on any problem."""
    try:
        return Policy.model_validate(_read_json(path, "policy"))
    except ValidationError as exc:
        raise RegistryError(f"policy {path} is invalid: {exc}") from exc
