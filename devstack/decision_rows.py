"""Decision records as analysts read them: one flat row per record, and the filters of
``cascade decisions``. Pure functions: reading the stream is :mod:`devstack.decisions`."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from cascade.v1 import decisions_pb2, scoring_pb2

__all__ = ["ROW_FIELDS", "DecisionFilter", "decision_row", "parse_time_ms"]

ROW_FIELDS: Final = (
    "stream_seq",
    "transaction_id",
    "card_id",
    "merchant_id",
    "merchant_category",
    "amount_minor",
    "currency",
    "country",
    "channel",
    "timestamp_ms",
    "device_id",
    "ip_country",
    "decision",
    "score",
    "stage1_score",
    "stage2_score",
    "decided_by",
    "degraded",
    "reasons",
    "escalated",
    "policy_version",
    "stage1_version",
    "stage2_version",
    "feature_set",
    "total_us",
    "redis_us",
    "features_us",
    "stage1_us",
    "stage2_us",
    "budget_us",
    "deadline_left_us",
    "trace_id",
    "decided_at_ms",
    "method",
    "features",
)
"""The columns, in order (JSON Lines keys and the Parquet schema)."""

_RELATIVE: Final = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _name(enum: object, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix)  # type: ignore[attr-defined]


def decision_row(record: decisions_pb2.DecisionRecord, stream_seq: int = 0) -> dict[str, object]:
    """One record as a flat row (:data:`ROW_FIELDS`): enums by name without their prefix,
    stage scores None where that stage gave none."""
    tx, a = record.transaction, record.answer
    decided_by = _name(scoring_pb2.DecidedBy, a.decided_by, "DECIDED_BY_")
    return {
        "stream_seq": stream_seq,
        "transaction_id": tx.transaction_id,
        "card_id": tx.card_id,
        "merchant_id": tx.merchant_id,
        "merchant_category": tx.merchant_category,
        "amount_minor": tx.amount_minor,
        "currency": tx.currency,
        "country": tx.country,
        "channel": _name(scoring_pb2.Channel, tx.channel, "CHANNEL_"),
        "timestamp_ms": tx.timestamp_ms,
        "device_id": tx.device_id,
        "ip_country": tx.ip_country,
        "decision": _name(scoring_pb2.Decision, a.decision, "DECISION_"),
        "score": a.score,
        "stage1_score": None if decided_by == "DEFAULT" else a.stage1_score,
        "stage2_score": record.stage2_score if record.HasField("stage2_score") else None,
        "decided_by": decided_by,
        "degraded": a.degraded,
        "reasons": [_name(scoring_pb2.Reason, r, "REASON_") for r in a.reasons],
        "escalated": a.escalated,
        "policy_version": a.versions.policy,
        "stage1_version": a.versions.stage1,
        "stage2_version": a.versions.stage2,
        "feature_set": a.versions.feature_set,
        "total_us": a.timings.total_us,
        "redis_us": a.timings.redis_us,
        "features_us": a.timings.features_us,
        "stage1_us": a.timings.stage1_us,
        "stage2_us": a.timings.stage2_us,
        "budget_us": a.timings.budget_us,
        "deadline_left_us": a.timings.deadline_left_us,
        "trace_id": a.trace_id,
        "decided_at_ms": record.decided_at_ms,
        "method": _name(decisions_pb2.DecisionRecord.Method, record.method, "METHOD_"),
        "features": list(record.features),
    }


@dataclass(frozen=True, slots=True)
class DecisionFilter:
    """What ``cascade decisions`` keeps; every field that is set must match."""

    card_tokens: frozenset[str] | None = None
    """The card's tokens (records hold tokens, never card ids: :mod:`cascade.pseudonym`); a
    record under any of them matches (two while a key is rotated)."""
    decision: str | None = None
    """APPROVE, REVIEW or DECLINE."""
    reason: str | None = None
    """A reason code the answer carries (e.g. STAGE2_TIMEOUT)."""
    decided_by: str | None = None
    policy_version: str | None = None
    stage1_version: str | None = None
    stage2_version: str | None = None
    since_ms: int | None = None
    """Decided at or after (epoch ms)."""
    until_ms: int | None = None
    """Decided before (epoch ms)."""

    def matches(self, row: dict[str, object]) -> bool:
        """True when ``row`` (from :func:`decision_row`) passes every set condition."""
        if self.card_tokens is not None and row["card_id"] not in self.card_tokens:
            return False
        checks = (
            ("decision", self.decision),
            ("decided_by", self.decided_by),
            ("policy_version", self.policy_version),
            ("stage1_version", self.stage1_version),
            ("stage2_version", self.stage2_version),
        )
        if any(want is not None and row[key] != want for key, want in checks):
            return False
        reasons = row["reasons"]
        if self.reason is not None and self.reason not in reasons:  # type: ignore[operator]
            return False
        decided_at = int(row["decided_at_ms"])  # type: ignore[call-overload]
        if self.since_ms is not None and decided_at < self.since_ms:
            return False
        return self.until_ms is None or decided_at < self.until_ms


def parse_time_ms(text: str, *, now_s: float | None = None) -> int:
    """Epoch ms from an ISO 8601 time (``2026-12-01T10:00:00Z``; no zone means UTC), epoch
    milliseconds, or a span back from now (``30s``, ``15m``, ``2h``, ``7d``); ValueError else."""
    text = text.strip()
    now = time.time() if now_s is None else now_s
    relative = _RELATIVE.fullmatch(text)
    if relative:
        return int((now - float(relative[1]) * _UNIT_S[relative[2]]) * 1000)
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is not an ISO 8601 time, epoch milliseconds or a span like 15m"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)
