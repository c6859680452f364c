"""Domain values to ``cascade.v1`` wire messages, for clients of the API (CLI, load tests).

Pure. The reverse direction, with validation, is :mod:`orchestrator.validation`.
"""

from __future__ import annotations

from cascade.transaction import Transaction
from cascade.v1 import scoring_pb2


def to_wire(tx: Transaction) -> scoring_pb2.Transaction:
    """The wire form of a domain transaction (empty optional fields are left unset)."""
    wire = scoring_pb2.Transaction(
        transaction_id=tx.transaction_id,
        card_id=tx.card_id,
        merchant_id=tx.merchant_id,
        merchant_category=tx.merchant_category,
        amount_minor=tx.amount_minor,
        currency=tx.currency,
        country=tx.country,
        channel=scoring_pb2.Channel.ValueType(int(tx.channel)),
        timestamp_ms=tx.timestamp_ms,
    )
    if tx.device_id:
        wire.device_id = tx.device_id
    if tx.ip_country:
        wire.ip_country = tx.ip_country
    return wire
