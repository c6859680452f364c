"""Input validation: every rejection names the field; valid input round-trips."""

from __future__ import annotations

import pytest

from cascade.errors import InvalidInputError
from cascade.transaction import Channel
from cascade.v1 import scoring_pb2
from orchestrator.validation import (
    MAX_BATCH,
    validate_batch,
    validate_request,
    validate_transaction,
)
from tests.conftest import BASE_TS_MS, make_wire_transaction


def test_valid_transaction_becomes_domain_value() -> None:
    tx = validate_transaction(make_wire_transaction())
    assert tx.transaction_id == "tx-0001"
    assert tx.amount_minor == 12_345
    assert tx.channel is Channel.CARD_PRESENT
    assert tx.timestamp_ms == BASE_TS_MS


def test_optional_fields_may_be_absent() -> None:
    wire = make_wire_transaction()
    wire.ClearField("device_id")
    wire.ClearField("ip_country")
    tx = validate_transaction(wire)
    assert (tx.device_id, tx.ip_country) == ("", "")


def test_missing_transaction_is_named() -> None:
    with pytest.raises(InvalidInputError) as info:
        validate_request(scoring_pb2.ScoreRequest())
    assert info.value.field == "transaction"


@pytest.mark.parametrize(
    ("overrides", "field", "fragment"),
    [
        ({"transaction_id": ""}, "transaction.transaction_id", "required"),
        ({"card_id": ""}, "transaction.card_id", "required"),
        ({"merchant_id": ""}, "transaction.merchant_id", "required"),
        ({"card_id": "x" * 65}, "transaction.card_id", "at most 64"),
        ({"transaction_id": "has space"}, "transaction.transaction_id", "A-Z a-z 0-9"),
        ({"merchant_category": "54a1"}, "transaction.merchant_category", "MCC"),
        ({"merchant_category": ""}, "transaction.merchant_category", "required"),
        ({"amount_minor": -5}, "transaction.amount_minor", "> 0"),
        ({"amount_minor": 0}, "transaction.amount_minor", "> 0"),
        ({"amount_minor": 10**15}, "transaction.amount_minor", "exceeds"),
        ({"currency": "XXY"}, "transaction.currency", "ISO 4217"),
        ({"currency": ""}, "transaction.currency", "required"),
        ({"country": "ZZ"}, "transaction.country", "ISO 3166"),
        ({"channel": scoring_pb2.CHANNEL_UNSPECIFIED}, "transaction.channel", "required"),
        ({"channel": 99}, "transaction.channel", "unknown"),
        ({"timestamp_ms": 1_700_000_000}, "transaction.timestamp_ms", "milliseconds"),
        ({"device_id": "d" * 129}, "transaction.device_id", "at most 128"),
        ({"ip_country": "usa"}, "transaction.ip_country", "ISO 3166"),
    ],
)
def test_bad_field_is_named(overrides: dict[str, object], field: str, fragment: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        validate_transaction(make_wire_transaction(**overrides))
    assert info.value.field == field
    assert fragment in str(info.value)
    assert str(info.value).startswith(field)


def test_oversize_value_is_not_echoed_whole() -> None:
    with pytest.raises(InvalidInputError) as info:
        validate_transaction(make_wire_transaction(currency="Q" * 10_000))
    assert len(str(info.value)) < 100


def test_batch_errors_name_the_index_and_field() -> None:
    request = scoring_pb2.ScoreBatchRequest(
        transactions=[
            make_wire_transaction(transaction_id="a"),
            make_wire_transaction(transaction_id="b", currency="ZZZ"),
        ]
    )
    with pytest.raises(InvalidInputError) as info:
        validate_batch(request)
    assert info.value.field == "transactions[1].currency"


def test_batch_rejects_duplicates_empty_and_oversize() -> None:
    dup = scoring_pb2.ScoreBatchRequest(
        transactions=[
            make_wire_transaction(transaction_id="a"),
            make_wire_transaction(transaction_id="a"),
        ]
    )
    with pytest.raises(InvalidInputError, match=r"duplicates transactions\[0\]") as info:
        validate_batch(dup)
    assert info.value.field == "transactions[1].transaction_id"
    with pytest.raises(InvalidInputError, match="at least one"):
        validate_batch(scoring_pb2.ScoreBatchRequest())
    many = scoring_pb2.ScoreBatchRequest(
        transactions=[make_wire_transaction(transaction_id=f"t{i}") for i in range(MAX_BATCH + 1)]
    )
    with pytest.raises(InvalidInputError, match="at most"):
        validate_batch(many)


def test_valid_batch_keeps_order() -> None:
    request = scoring_pb2.ScoreBatchRequest(
        transactions=[make_wire_transaction(transaction_id=f"t{i}") for i in range(5)]
    )
    assert [tx.transaction_id for tx in validate_batch(request)] == [f"t{i}" for i in range(5)]
