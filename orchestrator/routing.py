"""Routing and decision rules of the cascade: pure functions of scores, policy and budget."""

from __future__ import annotations

from enum import StrEnum

from cascade.decision import Decision
from cascade.model_registry import Policy

__all__ = ["Decision", "Route", "decide", "route"]


class Route(StrEnum):
    """What to do after stage 1."""

    ANSWER = "ANSWER"  # stage 1's score is outside the band: it decides
    ESCALATE = "ESCALATE"  # in the band and there is time for stage 2
    NO_TIME = "NO_TIME"  # in the band but too little budget left for stage 2


def route(stage1_score: float, policy: Policy, remaining_ms: float, stage2_min_ms: float) -> Route:
    """Escalate only when the score is in the policy's band and time remains."""
    if not policy.escalates(stage1_score):
        return Route.ANSWER
    if remaining_ms < stage2_min_ms:
        return Route.NO_TIME
    return Route.ESCALATE


def decide(score: float, policy: Policy) -> Decision:
    """Map a final fraud score to a decision by the policy's thresholds."""
    return policy.decide(score)
