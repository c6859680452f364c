"""Shared test helpers: sample transactions, the test session's pseudonym key."""

from __future__ import annotations

import dataclasses
import secrets
from typing import Final

import pytest

from cascade.pseudonym import Pseudonymizer, PseudonymKey
from cascade.transaction import Channel, Transaction
from cascade.v1 import scoring_pb2

BASE_TS_MS = 1_763_800_000_000

TEST_PSEUDONYM_KEY: Final = secrets.token_hex(32)
"""The key every orchestrator a test starts hashes ids with: made at test time, per session."""
TEST_PSEUDONYMS: Final = Pseudonymizer(PseudonymKey("k1", TEST_PSEUDONYM_KEY.encode()))
"""What those orchestrators store a card or device under (``TEST_PSEUDONYMS.card("card-42")``)."""
TEST_PSEUDONYM_ENV: Final = {"CASCADE_PSEUDONYM__KEY": TEST_PSEUDONYM_KEY}
"""The environment that gives an orchestrator process that key."""


def make_transaction(**overrides: object) -> Transaction:
    """A valid domain transaction; keyword arguments replace fields."""
    tx = Transaction(
        transaction_id="tx-0001",
        card_id="card-42",
        merchant_id="m-7",
        merchant_category="5411",
        amount_minor=12_345,
        currency="EUR",
        country="DE",
        channel=Channel.CARD_PRESENT,
        timestamp_ms=BASE_TS_MS,
        device_id="dev-1",
        ip_country="DE",
    )
    return dataclasses.replace(tx, **overrides)  # type: ignore[arg-type]


def make_wire_transaction(**overrides: object) -> scoring_pb2.Transaction:
    """A valid wire transaction; keyword arguments replace fields."""
    fields: dict[str, object] = {
        "transaction_id": "tx-0001",
        "card_id": "card-42",
        "merchant_id": "m-7",
        "merchant_category": "5411",
        "amount_minor": 12_345,
        "currency": "EUR",
        "country": "DE",
        "channel": scoring_pb2.CHANNEL_CARD_PRESENT,
        "timestamp_ms": BASE_TS_MS,
        "device_id": "dev-1",
        "ip_country": "DE",
    }
    fields.update(overrides)
    return scoring_pb2.Transaction(**fields)  # type: ignore[arg-type]


@pytest.fixture
def wire_tx() -> scoring_pb2.Transaction:
    """A valid wire transaction."""
    return make_wire_transaction()
