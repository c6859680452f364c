"""The one decision type: what the caller acts on. Values match ``cascade.v1.Decision`` names
without the prefix, policy files' wording and ``CASCADE_DEFAULT_DECISION``'s values."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Decision"]


class Decision(StrEnum):
    """APPROVE, REVIEW or DECLINE."""

    APPROVE = "APPROVE"
    REVIEW = "REVIEW"
    DECLINE = "DECLINE"
