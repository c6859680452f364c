"""Outcome validation (each refusal names its field), message ids, and bulk file parsing."""

from __future__ import annotations

import pytest

from cascade.errors import InvalidInputError
from cascade.outcome_record import (
    VIA_FILE_IMPORT,
    decode_outcome,
    encode_outcome,
    outcome_message_id,
    outcome_subject,
    parse_outcome_file,
    validate_outcome,
)
from cascade.v1 import scoring_pb2 as R

NOW_MS = 1_800_000_000_000


def outcome(**fields: object) -> R.Outcome:
    values: dict[str, object] = {
        "transaction_id": "tx-1",
        "label": R.OUTCOME_LABEL_CHARGEBACK,
        "reported_at_ms": NOW_MS - 1000,
    }
    values.update(fields)
    return R.Outcome(**values)  # type: ignore[arg-type]


def test_a_valid_outcome_keeps_its_time_or_gets_now() -> None:
    assert validate_outcome(outcome(), now_ms=NOW_MS).reported_at_ms == NOW_MS - 1000
    assert validate_outcome(outcome(reported_at_ms=0), now_ms=NOW_MS).reported_at_ms == NOW_MS


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"transaction_id": ""}, "outcome.transaction_id"),
        ({"transaction_id": "tx 1"}, "outcome.transaction_id"),
        ({"transaction_id": "x" * 65}, "outcome.transaction_id"),
        ({"label": R.OUTCOME_LABEL_UNSPECIFIED}, "outcome.label"),
        ({"label": 99}, "outcome.label"),
        ({"reported_at_ms": 1_700_000}, "outcome.reported_at_ms"),
        ({"reported_at_ms": NOW_MS + 2 * 86_400_000}, "outcome.reported_at_ms"),
        ({"source": "a feed"}, "outcome.source"),
    ],
)
def test_each_refusal_names_its_field(fields: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        validate_outcome(outcome(**fields), now_ms=NOW_MS)
    assert caught.value.field == field


def test_one_message_id_per_transaction_and_kind() -> None:
    assert outcome_message_id(outcome()) == "tx-1:chargeback"
    assert outcome_message_id(outcome(label=R.OUTCOME_LABEL_GENUINE)) == "tx-1:genuine"
    assert (
        outcome_subject("outcomes", R.OUTCOME_LABEL_CONFIRMED_FRAUD) == "outcomes.confirmed_fraud"
    )


def test_records_round_trip() -> None:
    o = validate_outcome(outcome(source="feed"), now_ms=NOW_MS)
    record = decode_outcome(encode_outcome(o, NOW_MS, VIA_FILE_IMPORT))
    assert record.outcome == o and record.received_at_ms == NOW_MS
    with pytest.raises(ValueError, match=r"not a cascade\.v1\.OutcomeRecord"):
        decode_outcome(b"\xff\xff")


def test_csv_and_jsonl_files_parse() -> None:
    csv_text = (
        "transaction_id,label,reported_at,source\n"
        "tx-1,chargeback,1800000000000,feed\n"
        "tx-2,GENUINE,2027-01-15T10:00:00Z,\n"
        "tx-3,OUTCOME_LABEL_CONFIRMED_FRAUD,,\n"
    )
    rows = list(parse_outcome_file(csv_text, jsonl=False))
    assert [(n, o.transaction_id, o.label) for n, o in rows] == [
        (2, "tx-1", R.OUTCOME_LABEL_CHARGEBACK),
        (3, "tx-2", R.OUTCOME_LABEL_GENUINE),
        (4, "tx-3", R.OUTCOME_LABEL_CONFIRMED_FRAUD),
    ]
    assert rows[1][1].reported_at_ms == 1_800_007_200_000  # 2027-01-15T10:00:00Z
    assert rows[2][1].reported_at_ms == 0
    jsonl = '{"transaction_id": "tx-9", "label": "chargeback", "reported_at_ms": 1800000000000}\n\n'
    ((n, o),) = parse_outcome_file(jsonl, jsonl=True)
    assert (n, o.transaction_id, o.reported_at_ms) == (1, "tx-9", 1_800_000_000_000)


@pytest.mark.parametrize(
    ("text", "jsonl", "where"),
    [
        ("transaction_id,label\ntx-1,stolen\n", False, "line 2"),
        ("id,label\ntx-1,genuine\n", False, "line 1"),
        ("transaction_id,label,reported_at\ntx-1,genuine,yesterday\n", False, "line 2"),
        ("transaction_id,label,reported_at\ntx-1,genuine,2027-01-01T00:00:00\n", False, "line 2"),
        ('{"transaction_id": "a", "label": "genuine"}\nnot json\n', True, "line 2"),
        ("[1, 2]\n", True, "line 1"),
    ],
)
def test_bad_rows_name_their_line(text: str, jsonl: bool, where: str) -> None:
    with pytest.raises(ValueError, match=where):
        list(parse_outcome_file(text, jsonl=jsonl))
