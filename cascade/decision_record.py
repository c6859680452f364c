"""The decision log's record: what one answer looks like on the ``DECISIONS`` stream.

Pure functions only (no I/O): the orchestrator's request path captures a
:class:`PendingDecision` (references to protobuf messages it already built, nothing copied or
encoded), and the decision log's background task turns it into bytes with
:func:`encode_decision`. ``cascade decisions`` reads records back with :func:`decode_decision`.

The record is a protobuf message, ``cascade.v1.DecisionRecord`` (``protos/cascade/v1/
decisions.proto``), that embeds the public API's own ``Transaction`` and ``ScoreResponse``: the
transaction as sent and the answer exactly as sent, so the log can never drift from the API, and
encoding is one C-level copy and serialization per record (JSON would cost several times more
CPU per answer, the orchestrator's most watched number).
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError

from cascade.v1 import decisions_pb2, scoring_pb2

__all__ = [
    "METHOD_SCORE",
    "METHOD_SCORE_BATCH",
    "PendingDecision",
    "decision_subject",
    "decode_decision",
    "encode_decision",
    "message_id",
]

METHOD_SCORE: Final = decisions_pb2.DecisionRecord.METHOD_SCORE
METHOD_SCORE_BATCH: Final = decisions_pb2.DecisionRecord.METHOD_SCORE_BATCH

# What a transaction id may hold once validated (orchestrator.validation's alphabet and length);
# only such an id may become a NATS header value.
_MESSAGE_ID: Final = re.compile(r"[A-Za-z0-9_.:/+=@-]{1,64}")
_SUBJECT_TOKENS: Final = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_STAGE2: Final = scoring_pb2.DECIDED_BY_STAGE2


class PendingDecision(NamedTuple):
    """One answer as the request path hands it over: cheap to build (a tuple of references)."""

    transaction: scoring_pb2.Transaction
    answer: scoring_pb2.ScoreResponse
    features: npt.NDArray[np.float32] | None
    decided_at_ms: int
    method: decisions_pb2.DecisionRecord.Method.ValueType


def decision_subject(prefix: str, policy_version: str) -> str:
    """``<prefix>.<policy version>``; ValueError when either is not a plain subject (no
    wildcards, spaces or empty tokens), so a policy version can never publish elsewhere."""
    subject = f"{prefix}.{policy_version}"
    if not _SUBJECT_TOKENS.fullmatch(subject):
        raise ValueError(
            f"decision subject {subject!r} is not a NATS subject of A-Z a-z 0-9 _ - tokens"
        )
    return subject


def message_id(transaction_id: str) -> str | None:
    """The ``Nats-Msg-Id`` for a transaction: its id, or None when the id is not one validation
    would accept (a shed call is answered before validation: its id is unchecked)."""
    return transaction_id if _MESSAGE_ID.fullmatch(transaction_id) else None


def encode_decision(pending: PendingDecision) -> bytes:
    """The wire bytes of ``pending`` as a ``cascade.v1.DecisionRecord``."""
    record = decisions_pb2.DecisionRecord(
        transaction=pending.transaction,
        answer=pending.answer,
        decided_at_ms=pending.decided_at_ms,
        method=pending.method,
    )
    if pending.features is not None:
        record.features.extend(pending.features.tolist())
    if pending.answer.decided_by == _STAGE2:
        record.stage2_score = pending.answer.score
    return record.SerializeToString()


def decode_decision(data: bytes) -> decisions_pb2.DecisionRecord:
    """Parse a record; ValueError when ``data`` is not one."""
    record = decisions_pb2.DecisionRecord()
    try:
        record.ParseFromString(data)
    except DecodeError as exc:
        raise ValueError(f"not a cascade.v1.DecisionRecord ({len(data)} bytes): {exc}") from None
    return record
