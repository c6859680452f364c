"""Sample traffic for ``cascade score`` and ``cascade up --sample``: a few ordinary cards plus
two suspicious sequences (a card-testing burst and an account takeover), deterministic per seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Final

from cascade.v1 import scoring_pb2

_START_MS: Final = 1_763_800_000_000
_MERCHANTS: Final = (
    ("m-grocer", "5411", "DE", "EUR"),
    ("m-fuel", "5541", "DE", "EUR"),
    ("m-books", "5942", "FR", "EUR"),
    ("m-cafe", "5814", "GB", "GBP"),
    ("m-shop", "5311", "US", "USD"),
    ("m-air", "4511", "NL", "EUR"),
)


def sample_transactions(count: int, *, seed: int = 7) -> Iterator[scoring_pb2.Transaction]:
    """``count`` valid transactions in time order."""
    rng = random.Random(seed)
    now = _START_MS
    for i in range(count):
        now += rng.randint(5_000, 600_000)
        kind = i % 10
        card = f"card-{rng.randint(1, 5)}"
        merchant, mcc, country, currency = rng.choice(_MERCHANTS)
        device, ip_country = f"dev-{card}", country
        amount = rng.randint(500, 12_000)
        channel = scoring_pb2.CHANNEL_CARD_PRESENT
        if kind in (7, 8):  # card testing: tiny online charges in a burst, then a large one
            card, merchant, mcc, country, currency = "card-test", "m-webstore", "5999", "US", "USD"
            channel = scoring_pb2.CHANNEL_ECOMMERCE
            amount = 99 if kind == 7 else 189_900
            now += 2_000
            device, ip_country = "dev-unknown", "RO"
        elif kind == 9:  # account takeover: new device and country, expensive electronics
            card, merchant, mcc, country, currency = "card-1", "m-electro", "5732", "BR", "BRL"
            channel = scoring_pb2.CHANNEL_ECOMMERCE
            amount = 899_000
            device, ip_country = "dev-new", "NG"
        yield scoring_pb2.Transaction(
            transaction_id=f"tx-{seed}-{i:05d}",
            card_id=card,
            merchant_id=merchant,
            merchant_category=mcc,
            amount_minor=amount,
            currency=currency,
            country=country,
            channel=channel,
            timestamp_ms=now,
            device_id=device,
            ip_country=ip_country,
        )
