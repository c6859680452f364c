"""Property-based tests of the request path's pure part: bytes -> message -> validated values.

Whatever a caller sends, decoding and validation either produce a transaction or raise
``InvalidInputError`` naming the field the proto's rules say is wrong (see
``tests/fuzz_strategies.py`` for the oracle); nothing else escapes, and what a valid transaction
feeds (fingerprint, history entry, features) takes any value validation lets through.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cascade.errors import InvalidInputError
from cascade.features import (
    decode_history_entry,
    encode_history_entry,
    history_entry,
    screening_features,
    sequence_tensor,
)
from cascade.v1 import scoring_pb2
from orchestrator.codec import decode_request
from orchestrator.online_store import transaction_fingerprint
from orchestrator.validation import validate_batch, validate_request, validate_transaction
from tests.conftest import make_wire_transaction
from tests.fuzz_strategies import (
    FUZZ,
    ID_CHARS,
    ODD_STRINGS,
    REFUSAL,
    first_invalid_field,
    mutated,
    raw_fields,
    transaction_fields,
    wire_transaction,
)

# Pure and fast (about 1 ms an example): more examples than the wire-level properties get.
FUZZ_PURE = settings(FUZZ, max_examples=400)
_VALID_BODY = scoring_pb2.ScoreRequest(transaction=make_wire_transaction()).SerializeToString()
_VALID_BATCH_BODY = scoring_pb2.ScoreBatchRequest(
    transactions=[make_wire_transaction(transaction_id=f"tx-{i}") for i in range(3)]
).SerializeToString()


def _refusal(call: Callable[[], object]) -> str | None:
    """The message of the ``InvalidInputError`` that ``call`` raises; None if it returns."""
    try:
        call()
    except InvalidInputError as exc:
        return str(exc)
    return None


@FUZZ_PURE
@given(transaction_fields())
def test_validation_names_exactly_the_field_the_proto_rules_reject(
    fields: dict[str, object],
) -> None:
    expected = first_invalid_field(fields)
    wire = wire_transaction(fields)
    if expected is None:
        tx = validate_transaction(wire)
        assert tx.transaction_id == fields["transaction_id"]
        assert tx.amount_minor == fields["amount_minor"]
        assert int(tx.channel) == fields["channel"]
        return
    with pytest.raises(InvalidInputError) as info:
        validate_transaction(wire)
    assert info.value.field == f"transaction.{expected}"
    assert REFUSAL.fullmatch(str(info.value)), str(info.value)


@FUZZ_PURE
@given(st.lists(transaction_fields(), max_size=6), st.data())
def test_batch_validation_names_the_first_bad_index(
    batch: list[dict[str, object]], data: st.DataObject
) -> None:
    if len(batch) > 1 and data.draw(st.booleans()):  # a duplicated id, somewhere
        i, j = sorted(data.draw(st.lists(st.integers(0, len(batch) - 1), min_size=2, max_size=2)))
        if i != j:
            batch[j] = {**batch[j], "transaction_id": batch[i]["transaction_id"]}
    expected: str | None = None if batch else "transactions"
    seen: dict[object, int] = {}
    for i, fields in enumerate(batch):
        bad = first_invalid_field(fields)
        if bad is not None:
            expected = f"transactions[{i}].{bad}"
            break
        first = seen.setdefault(fields["transaction_id"], i)
        if first != i:
            expected = f"transactions[{i}].transaction_id"
            break
    request = scoring_pb2.ScoreBatchRequest(transactions=[wire_transaction(f) for f in batch])
    if expected is None:
        assert len(validate_batch(request)) == len(batch)
        return
    with pytest.raises(InvalidInputError) as info:
        validate_batch(request)
    assert info.value.field == expected
    assert REFUSAL.fullmatch(str(info.value)), str(info.value)


@FUZZ_PURE
@given(
    st.one_of(
        st.binary(max_size=300),
        raw_fields(),
        mutated(_VALID_BODY),
        raw_fields().map(lambda junk: _VALID_BODY + junk),
    )
)
@example(b"\x0a")  # a length-delimited field with no length
@example(b"\x0a\x05\x0a\x03\xff\xfe\xfd")  # transaction_id not UTF-8
@example(b"\x0a\x02\x28\x80")  # amount_minor: a varint cut short
@example(b"\x0b" * 200 + b"\x0c" * 200)  # groups nested past the parser's depth limit
@example(b"\x0a" * 64 + b"\x00")  # lengths that run past the end, nested
def test_any_score_body_decodes_and_validates_or_names_the_field(body: bytes) -> None:
    refusal = _refusal(lambda: validate_request(decode_request(scoring_pb2.ScoreRequest, body)))
    assert refusal is None or REFUSAL.fullmatch(refusal), refusal


@FUZZ_PURE
@given(st.one_of(st.binary(max_size=300), raw_fields(), mutated(_VALID_BATCH_BODY)))
def test_any_batch_body_decodes_and_validates_or_names_the_field(body: bytes) -> None:
    refusal = _refusal(lambda: validate_batch(decode_request(scoring_pb2.ScoreBatchRequest, body)))
    assert refusal is None or REFUSAL.fullmatch(refusal), refusal


def test_an_undecodable_body_names_the_request_and_no_internals() -> None:
    with pytest.raises(InvalidInputError) as info:
        decode_request(scoring_pb2.ScoreRequest, _VALID_BODY[:-3])
    assert info.value.field == "request"
    message = str(info.value)
    assert "cascade.v1.ScoreRequest" in message
    assert "Error" not in message and "class" not in message and "google" not in message


@FUZZ_PURE
@given(transaction_fields())
def test_what_validation_lets_through_the_scoring_path_takes(fields: dict[str, object]) -> None:
    try:
        tx = validate_transaction(wire_transaction(fields))
    except InvalidInputError:
        return
    assert re.fullmatch(r"[0-9a-f]{32}", transaction_fingerprint(tx))
    entry = history_entry(tx)
    assert decode_history_entry(encode_history_entry(entry)) == entry
    features = screening_features(tx, [entry, entry])
    assert np.isfinite(features).all()
    assert np.isfinite(sequence_tensor(tx, [entry])).all()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("merchant_category", "5411\n"),
        ("transaction_id", "tx-1\n"),
        ("card_id", "card-1\n"),
        ("merchant_id", "m-1\n"),
        ("device_id", "dev-1\n"),
    ],
)
def test_a_trailing_newline_is_refused(field: str, value: str) -> None:
    """Regression: "^...$" with ``match`` let one trailing newline through."""
    with pytest.raises(InvalidInputError) as info:
        validate_transaction(make_wire_transaction(**{field: value}))
    assert info.value.field == f"transaction.{field}"


@pytest.mark.parametrize(
    "value",
    [
        "550e8400-e29b-41d4-a716-446655440000",
        "urn:merchant:eu/1234",
        "tok_AbC+/dEf==",
        "tok-AbC_dEf",
        "shop@example.com",
        "tx-7-00000614.ab12p1",
    ],
)
def test_ids_of_the_documented_alphabet_are_accepted(value: str) -> None:
    tx = validate_transaction(
        make_wire_transaction(
            transaction_id=value, card_id=value, merchant_id=value, device_id=value
        )
    )
    assert (tx.transaction_id, tx.card_id, tx.merchant_id, tx.device_id) == (value,) * 4


@pytest.mark.parametrize(
    "value",
    [s for s in ODD_STRINGS if s and len(s) <= 64 and not set(s) <= ID_CHARS]
    + ["a b", "a\tb", 'a"b', "a{b}", "a*b", "a\\b", "a%b"],
)
def test_ids_outside_the_alphabet_are_refused_naming_the_field(value: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        validate_transaction(make_wire_transaction(card_id=value))
    assert info.value.field == "transaction.card_id"
    assert "A-Z a-z 0-9" in info.value.problem
