"""Pure conversions between the scoring path's values and the wire (``cascade.v1``) messages."""

from __future__ import annotations

from typing import Final, TypeVar

from google.protobuf.message import DecodeError, Message

from cascade.errors import InvalidInputError
from cascade.v1 import scoring_pb2
from orchestrator.results import DecidedBy, ModelVersions, Reason, ScoreResult, Timings
from orchestrator.routing import Decision

_DECISION_TO_PB: Final = {
    Decision.APPROVE: scoring_pb2.DECISION_APPROVE,
    Decision.REVIEW: scoring_pb2.DECISION_REVIEW,
    Decision.DECLINE: scoring_pb2.DECISION_DECLINE,
}
_DECISION_FROM_PB: Final = {v: k for k, v in _DECISION_TO_PB.items()}
_DECIDED_BY_TO_PB: Final = {
    d: scoring_pb2.DecidedBy.Value(f"DECIDED_BY_{d.value}") for d in DecidedBy
}
_DECIDED_BY_FROM_PB: Final = {v: k for k, v in _DECIDED_BY_TO_PB.items()}
_REASON_TO_PB: Final = {r: scoring_pb2.Reason.Value(f"REASON_{r.value}") for r in Reason}

MessageT = TypeVar("MessageT", bound=Message)


def decode_request(message: type[MessageT], body: bytes) -> MessageT:
    """Parse a request body as ``message``, or raise ``InvalidInputError`` naming ``request``.

    The caller hears that the body is not a ``cascade.v1`` message of that type (truncated,
    mangled, a string field not UTF-8, nested too deep): nothing of the parser's internals.
    """
    try:
        return message.FromString(body)
    except DecodeError:
        raise InvalidInputError(
            "request", f"is not a decodable {message.DESCRIPTOR.full_name} ({len(body)} bytes)"
        ) from None


def versions_to_proto(versions: ModelVersions) -> scoring_pb2.ModelVersions:
    """Wire form of the versions in force."""
    return scoring_pb2.ModelVersions(
        policy=versions.policy,
        stage1=versions.stage1,
        stage2=versions.stage2,
        feature_set=versions.feature_set,
    )


def timings_to_proto(timings: Timings) -> scoring_pb2.StageTimings:
    """Wire form of the per-stage timings."""
    return scoring_pb2.StageTimings(
        total_us=timings.total_us,
        redis_us=timings.redis_us,
        stage1_us=timings.stage1_us,
        stage2_us=timings.stage2_us,
        features_us=timings.features_us,
        budget_us=timings.budget_us,
        deadline_left_us=timings.deadline_left_us,
    )


def result_to_proto(
    result: ScoreResult, versions: scoring_pb2.ModelVersions, trace_id: str
) -> scoring_pb2.ScoreResponse:
    """The ``ScoreResponse`` for ``result``."""
    return scoring_pb2.ScoreResponse(
        transaction_id=result.transaction_id,
        decision=_DECISION_TO_PB[result.decision],
        score=result.score,
        decided_by=_DECIDED_BY_TO_PB[result.decided_by],
        degraded=result.degraded,
        reasons=[_REASON_TO_PB[r] for r in result.reasons],
        versions=versions,
        timings=timings_to_proto(result.timings),
        trace_id=trace_id,
        escalated=result.escalated,
        stage1_score=result.stage1_score if result.stage1_score is not None else 0.0,
    )


def encode_cached(result: ScoreResult) -> bytes:
    """What the output cache stores for a (non-degraded) answer: decision, scores, route."""
    return scoring_pb2.ScoreResponse(
        decision=_DECISION_TO_PB[result.decision],
        score=result.score,
        decided_by=_DECIDED_BY_TO_PB[result.decided_by],
        escalated=result.escalated,
        stage1_score=result.stage1_score if result.stage1_score is not None else 0.0,
    ).SerializeToString()


def decode_cached(data: bytes, transaction_id: str) -> ScoreResult:
    """Rebuild a cached answer, now labelled ``CACHE``; ValueError if the entry is unreadable."""
    message = scoring_pb2.ScoreResponse()
    try:
        message.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError, a bare Exception subclass
        raise ValueError(f"unreadable cache entry: {exc}") from exc
    if message.decision not in _DECISION_FROM_PB:
        raise ValueError("cache entry has no decision")
    return ScoreResult(
        transaction_id=transaction_id,
        decision=_DECISION_FROM_PB[message.decision],
        score=message.score,
        decided_by=DecidedBy.CACHE,
        stage1_score=message.stage1_score,
        escalated=message.escalated,
    )
