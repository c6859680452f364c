"""The transaction as a plain value: what validation produces and what the features read.

Kept free of protobuf so training, the simulator and the online path share one type.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Channel(IntEnum):
    """How the card was presented; values match ``cascade.v1.Channel``."""

    CARD_PRESENT = 1
    CONTACTLESS = 2
    ECOMMERCE = 3
    MAIL_PHONE_ORDER = 4
    ATM = 5
    RECURRING = 6


@dataclass(frozen=True, slots=True)
class Transaction:
    """One validated payment. ``amount_minor`` is in the currency's minor unit.

    Past validation the orchestrator holds it with ``card_id`` and ``device_id`` replaced by
    their tokens (:meth:`cascade.pseudonym.Pseudonymizer.transaction`)."""

    transaction_id: str
    card_id: str
    merchant_id: str
    merchant_category: str
    amount_minor: int
    currency: str
    country: str
    channel: Channel
    timestamp_ms: int
    device_id: str = ""
    ip_country: str = ""
    previous_card_id: str = ""
    """Only while a pseudonym key is rotated, in the orchestrator: the card's token under the
    previous key (``card_id`` then holds its token under the current one). No feature reads it."""
