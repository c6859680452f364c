"""Domain -> wire conversion for API clients."""

from __future__ import annotations

from cascade.transaction import Channel
from cascade.wire import to_wire
from orchestrator.validation import validate_transaction
from tests.conftest import make_transaction


def test_to_wire_round_trips_through_validation() -> None:
    tx = make_transaction(channel=Channel.ECOMMERCE)
    assert validate_transaction(to_wire(tx)) == tx


def test_to_wire_leaves_empty_optional_fields_unset() -> None:
    wire = to_wire(make_transaction(device_id="", ip_country=""))
    assert not wire.HasField("device_id")
    assert not wire.HasField("ip_country")
