"""Outcomes (labels) as the cascade stores them: validation, the ``OUTCOMES`` stream's subject and
message id, the record's encoding, and the rows of a bulk import file.

Pure functions only (no I/O): :mod:`cascade.outcome_store` publishes, ``ReportOutcome``
(:mod:`orchestrator.server`) and ``cascade outcomes import`` validate with the same code, so a
label is refused for the same reason whichever way it comes in.

* Subject ``<prefix>.<label kind>`` (``outcomes.chargeback``), message id
  ``<transaction id>:<label kind>``: the same label sent twice (a retried call, a file imported
  twice) is stored once within the stream's duplicate window, while a chargeback after a
  confirmed-fraud label for the same transaction is a second record.
* Bulk files: CSV with a header, or JSON Lines, with the columns ``transaction_id``, ``label``
  (``confirmed_fraud``, ``chargeback``, ``genuine``; any case, the enum's full name too),
  ``reported_at`` (epoch ms, or ISO 8601; empty: when imported) and optionally ``source``.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Final

from google.protobuf.message import DecodeError

from cascade.errors import InvalidInputError
from cascade.v1 import outcomes_pb2, scoring_pb2

__all__ = [
    "FRAUD_LABELS",
    "LABEL_KINDS",
    "VIA_FILE_IMPORT",
    "VIA_GRPC",
    "decode_outcome",
    "encode_outcome",
    "label_kind",
    "outcome_message_id",
    "outcome_subject",
    "parse_label",
    "parse_outcome_file",
    "validate_outcome",
]

VIA_GRPC: Final = outcomes_pb2.OutcomeRecord.VIA_GRPC
VIA_FILE_IMPORT: Final = outcomes_pb2.OutcomeRecord.VIA_FILE_IMPORT

_MAX_ID_CHARS: Final = 64
_ID_CHARS: Final = re.compile(r"[A-Za-z0-9_.:/+=@-]+")
# Reports dated before 2000 or more than a day ahead of the server clock are typos.
_MIN_REPORTED_MS: Final = 946_684_800_000
_MAX_AHEAD_MS: Final = 86_400_000

LABEL_KINDS: Final[dict[int, str]] = {
    scoring_pb2.OUTCOME_LABEL_CONFIRMED_FRAUD: "confirmed_fraud",
    scoring_pb2.OUTCOME_LABEL_CHARGEBACK: "chargeback",
    scoring_pb2.OUTCOME_LABEL_GENUINE: "genuine",
}
"""Each valid label and its kind (the subject token and the message id's suffix)."""

FRAUD_LABELS: Final = frozenset(
    {scoring_pb2.OUTCOME_LABEL_CONFIRMED_FRAUD, scoring_pb2.OUTCOME_LABEL_CHARGEBACK}
)
"""The labels that make a transaction count as fraud."""

_BY_NAME: Final = {kind: label for label, kind in LABEL_KINDS.items()} | {
    scoring_pb2.OutcomeLabel.Name(scoring_pb2.OutcomeLabel.ValueType(label)).lower(): label
    for label in LABEL_KINDS
}


def label_kind(label: int) -> str:
    """``confirmed_fraud``, ``chargeback`` or ``genuine``; ValueError for any other value."""
    try:
        return LABEL_KINDS[label]
    except KeyError:
        raise ValueError(f"not an outcome label: {label}") from None


def parse_label(text: str) -> scoring_pb2.OutcomeLabel.ValueType:
    """A label from its kind or enum name, any case; InvalidInputError naming ``label``."""
    label = _BY_NAME.get(text.strip().lower())
    if label is None:
        raise InvalidInputError(
            "outcome.label", f"{text!r} is not one of confirmed_fraud, chargeback, genuine"
        )
    return scoring_pb2.OutcomeLabel.ValueType(label)


def _identifier(value: str, field: str, *, required: bool) -> None:
    if not value:
        if required:
            raise InvalidInputError(field, "required")
        return
    if len(value) > _MAX_ID_CHARS:
        raise InvalidInputError(field, f"longer than {_MAX_ID_CHARS} characters")
    if not _ID_CHARS.fullmatch(value):
        raise InvalidInputError(field, "only A-Z a-z 0-9 and - _ . : / + = @ are allowed")


def validate_outcome(outcome: scoring_pb2.Outcome, *, now_ms: int) -> scoring_pb2.Outcome:
    """A copy of ``outcome`` with ``reported_at_ms`` filled in (``now_ms`` when 0), or
    InvalidInputError naming the first offending field (``outcome.<field>``)."""
    _identifier(outcome.transaction_id, "outcome.transaction_id", required=True)
    if outcome.label not in LABEL_KINDS:
        raise InvalidInputError("outcome.label", "required: CONFIRMED_FRAUD, CHARGEBACK or GENUINE")
    reported = outcome.reported_at_ms or now_ms
    if reported < _MIN_REPORTED_MS:
        raise InvalidInputError("outcome.reported_at_ms", "before 2000-01-01 (not epoch ms?)")
    if reported > now_ms + _MAX_AHEAD_MS:
        raise InvalidInputError("outcome.reported_at_ms", "more than a day in the future")
    _identifier(outcome.source, "outcome.source", required=False)
    return scoring_pb2.Outcome(
        transaction_id=outcome.transaction_id,
        label=outcome.label,
        reported_at_ms=reported,
        source=outcome.source,
    )


def outcome_subject(prefix: str, label: int) -> str:
    """``<prefix>.<label kind>``."""
    return f"{prefix}.{label_kind(label)}"


def outcome_message_id(outcome: scoring_pb2.Outcome) -> str:
    """``<transaction id>:<label kind>``: one stored record per transaction and kind."""
    return f"{outcome.transaction_id}:{label_kind(outcome.label)}"


def encode_outcome(
    outcome: scoring_pb2.Outcome,
    received_at_ms: int,
    via: outcomes_pb2.OutcomeRecord.Via.ValueType,
) -> bytes:
    """The wire bytes of a validated outcome as a ``cascade.v1.OutcomeRecord``."""
    return outcomes_pb2.OutcomeRecord(
        outcome=outcome, received_at_ms=received_at_ms, via=via
    ).SerializeToString()


def decode_outcome(data: bytes) -> outcomes_pb2.OutcomeRecord:
    """Parse a record; ValueError when ``data`` is not one."""
    record = outcomes_pb2.OutcomeRecord()
    try:
        record.ParseFromString(data)
    except DecodeError as exc:
        raise ValueError(f"not a cascade.v1.OutcomeRecord ({len(data)} bytes): {exc}") from None
    return record


def _reported_at_ms(value: object) -> int:
    if value is None or value == "":
        return 0
    if isinstance(value, bool):
        raise InvalidInputError("outcome.reported_at_ms", f"{value!r} is not a time")
    if isinstance(value, int | float):
        return int(value)
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    try:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInputError(
            "outcome.reported_at_ms", f"{text!r} is neither epoch ms nor ISO 8601"
        ) from None
    if stamp.tzinfo is None:
        raise InvalidInputError("outcome.reported_at_ms", f"{text!r} has no time zone")
    return int(stamp.timestamp() * 1000)


def _outcome_from(fields: dict[str, object]) -> scoring_pb2.Outcome:
    reported = fields.get("reported_at", fields.get("reported_at_ms"))
    return scoring_pb2.Outcome(
        transaction_id=str(fields.get("transaction_id") or ""),
        label=parse_label(str(fields.get("label") or "")),
        reported_at_ms=_reported_at_ms(reported),
        source=str(fields.get("source") or ""),
    )


def parse_outcome_file(text: str, *, jsonl: bool) -> Iterator[tuple[int, scoring_pb2.Outcome]]:
    """``(line number, outcome)`` for every row of a CSV (with a header) or JSON Lines file, not
    yet validated (:func:`validate_outcome`); ValueError names the line of an unparsable row."""
    if jsonl:
        for line_no, line in enumerate(io.StringIO(text), start=1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                if not isinstance(doc, dict):
                    raise ValueError("not a JSON object")
                yield line_no, _outcome_from(doc)
            except (ValueError, InvalidInputError) as exc:
                raise ValueError(f"line {line_no}: {exc}") from None
        return
    reader = csv.DictReader(io.StringIO(text))
    missing = {"transaction_id", "label"} - set(reader.fieldnames or ())
    if missing:
        raise ValueError(f"line 1: the header lacks {', '.join(sorted(missing))}")
    for row in reader:
        try:
            yield reader.line_num, _outcome_from(dict(row))
        except InvalidInputError as exc:
            raise ValueError(f"line {reader.line_num}: {exc}") from None
