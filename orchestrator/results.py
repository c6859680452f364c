"""Values the scoring path produces: versions, reason codes, timings and the result itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import numpy.typing as npt

from orchestrator.budget import Budget
from orchestrator.routing import Decision


class DecidedBy(StrEnum):
    """Which part of the cascade produced the score; names match ``cascade.v1.DecidedBy``."""

    CACHE = "CACHE"
    STAGE1 = "STAGE1"
    STAGE2 = "STAGE2"
    DEFAULT = "DEFAULT"


class Reason(StrEnum):
    """Why an answer is degraded; names match ``cascade.v1.Reason`` without the prefix."""

    STAGE2_TIMEOUT = "STAGE2_TIMEOUT"
    STAGE2_UNAVAILABLE = "STAGE2_UNAVAILABLE"
    STAGE2_OVERLOADED = "STAGE2_OVERLOADED"
    STAGE2_ERROR = "STAGE2_ERROR"
    STAGE1_TIMEOUT = "STAGE1_TIMEOUT"
    STAGE1_UNAVAILABLE = "STAGE1_UNAVAILABLE"
    STAGE1_ERROR = "STAGE1_ERROR"
    CACHE_UNAVAILABLE = "CACHE_UNAVAILABLE"
    FEATURES_UNAVAILABLE = "FEATURES_UNAVAILABLE"
    BUDGET_EXHAUSTED = "BUDGET_EXHAUSTED"
    OVERLOADED = "OVERLOADED"


@dataclass(frozen=True, slots=True)
class ModelVersions:
    """The versions that together produced (or would produce) an answer."""

    policy: str
    stage1: str
    stage2: str
    feature_set: str


@dataclass(slots=True)
class Timings:
    """Wall time per stage in microseconds; filled in as the request goes."""

    budget_us: int = 0
    redis_us: int = 0
    features_us: int = 0
    stage1_us: int = 0
    stage2_us: int = 0
    total_us: int = 0
    deadline_left_us: int = 0
    """The caller's deadline left when the handler started (0: none), from the budget."""

    @classmethod
    def of(cls, budget: Budget) -> Timings:
        """Empty timings for a call scored inside ``budget``."""
        left_ms = budget.caller_left_ms
        return cls(
            budget_us=int(budget.total_ms * 1000),
            deadline_left_us=0 if left_ms is None else max(1, int(left_ms * 1000)),
        )


@dataclass(slots=True)
class ScoreResult:
    """The cascade's answer for one transaction, before it is encoded for the wire."""

    transaction_id: str
    decision: Decision
    score: float
    decided_by: DecidedBy
    reasons: list[Reason] = field(default_factory=list)
    stage1_score: float | None = None
    escalated: bool = False
    timings: Timings = field(default_factory=Timings)
    features: npt.NDArray[np.float32] | None = field(default=None, compare=False, repr=False)
    """The screening features stage 1 read (a row of the request's matrix), for the decision
    log; None when none were computed (cache hit, default before the features)."""

    @property
    def degraded(self) -> bool:
        """True when any dependency failed or time ran out on the way to this answer."""
        return bool(self.reasons)
