"""Shared test helpers: sample transactions, the test session's pseudonym key; the session's
cores kept out of deep idle where the machine allows it."""

from __future__ import annotations

import dataclasses
import os
import secrets
from collections.abc import Iterator
from typing import Final

import pytest

from cascade.cpu_latency import CpuLatencyHold
from cascade.pseudonym import Pseudonymizer, PseudonymKey
from cascade.transaction import Channel, Transaction
from cascade.v1 import scoring_pb2

BASE_TS_MS = 1_763_800_000_000


@pytest.fixture(scope="session", autouse=True)
def cores_kept_awake() -> Iterator[CpuLatencyHold | None]:
    """The whole test session runs with the cores kept out of deep idle where it may
    (``/dev/cpu_dma_latency`` held at 0 µs, :mod:`cascade.cpu_latency`), as on a tuned scoring
    node. On a busy virtual machine a halted core waits for its host on every wake-up. In one
    hour that steal took 25-47% of the cores' time, and a clean-clone run had 7 tests fail on
    stage caps and deadlines. How the cascade behaves when it is stalled is tested on purpose,
    with stalls the tests make (SIGSTOP, a blocked loop). ``CASCADE_TESTS_KEEP_CORES_AWAKE=0``
    runs the session on the machine as it is."""
    if os.environ.get("CASCADE_TESTS_KEEP_CORES_AWAKE", "1") == "0":
        yield None
        return
    with CpuLatencyHold(0) as hold:
        yield hold if hold.held else None


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
