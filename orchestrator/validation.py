"""Turn a wire ``Transaction`` into a validated :class:`cascade.transaction.Transaction`.

Pure: no I/O. Every rejection raises :class:`InvalidInputError` naming the field, so the caller
gets INVALID_ARGUMENT with a message it can act on. Nothing is guessed or silently fixed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Final

from cascade.errors import InvalidInputError
from cascade.iso_codes import COUNTRIES, CURRENCY_EXPONENTS
from cascade.transaction import Channel, Transaction
from cascade.v1 import scoring_pb2

MAX_ID_CHARS: Final = 64
MAX_BATCH: Final = 1000
MAX_DEVICE_ID_CHARS: Final = 128
# Larger than any single card payment; catches unit mix-ups (major units sent as minor, or worse).
MAX_AMOUNT_MINOR: Final = 10**13
# 2000-01-01 .. 2100-01-01: a timestamp outside this is in seconds or microseconds, not ms.
MIN_TIMESTAMP_MS: Final = 946_684_800_000
MAX_TIMESTAMP_MS: Final = 4_102_444_800_000
# What scoring.proto allows in an id. Letters, digits and "-_.:/+=@" cover UUIDs, URNs, base64 and
# base64url tokens; left out are whitespace and control characters, quotes and backslash, Redis
# glob characters (*?[]) and hash-tag braces ({}), and everything outside ASCII.
ID_ALPHABET: Final = "A-Z a-z 0-9 - _ . : / + = @"
_ID_CHARS: Final = re.compile(r"[A-Za-z0-9_.:/+=@-]+")
# fullmatch, not "^...$": "$" also matches before a trailing newline ("5411\n" passed as an MCC).
_MCC: Final = re.compile(r"[0-9]{4}")
_PREFIX: Final = "transaction."


def _identifier(value: str, field: str, *, limit: int = MAX_ID_CHARS, required: bool = True) -> str:
    if not value:
        if required:
            raise InvalidInputError(_PREFIX + field, "is required")
        return ""
    if len(value) > limit:
        raise InvalidInputError(_PREFIX + field, f"is {len(value)} chars; at most {limit} allowed")
    if not _ID_CHARS.fullmatch(value):
        raise InvalidInputError(_PREFIX + field, f"may hold only {ID_ALPHABET}")
    return value


def _country(value: str, field: str, *, required: bool = True) -> str:
    if not value:
        if required:
            raise InvalidInputError(_PREFIX + field, "is required (ISO 3166-1 alpha-2)")
        return ""
    if value not in COUNTRIES:
        raise InvalidInputError(
            _PREFIX + field, f"{value[:8]!r} is not an ISO 3166-1 alpha-2 country code"
        )
    return value


def validate_request(request: scoring_pb2.ScoreRequest) -> Transaction:
    """Validate ``request`` and return its transaction, or raise ``InvalidInputError``."""
    if not request.HasField("transaction"):
        raise InvalidInputError("transaction", "is required")
    return validate_transaction(request.transaction)


def validate_batch(request: scoring_pb2.ScoreBatchRequest) -> list[Transaction]:
    """Validate every transaction of a batch; field paths read ``transactions[i].field``."""
    return list(iter_batch(request))


def iter_batch(request: scoring_pb2.ScoreBatchRequest) -> Iterator[Transaction]:
    """:func:`validate_batch` one transaction at a time, so that a caller can let other work
    run between them (the size is checked at the first step)."""
    n = len(request.transactions)
    if n == 0:
        raise InvalidInputError("transactions", "needs at least one transaction")
    if n > MAX_BATCH:
        raise InvalidInputError("transactions", f"has {n}; at most {MAX_BATCH} per call")
    seen: dict[str, int] = {}
    for i, wire in enumerate(request.transactions):
        try:
            tx = validate_transaction(wire)
        except InvalidInputError as exc:
            field = f"transactions[{i}].{exc.field.removeprefix(_PREFIX)}"
            raise InvalidInputError(field, exc.problem) from None
        first = seen.setdefault(tx.transaction_id, i)
        if first != i:
            raise InvalidInputError(
                f"transactions[{i}].transaction_id", f"duplicates transactions[{first}]"
            )
        yield tx


def validate_transaction(tx: scoring_pb2.Transaction) -> Transaction:
    """Validate one wire transaction field by field, in declaration order."""
    transaction_id = _identifier(tx.transaction_id, "transaction_id")
    card_id = _identifier(tx.card_id, "card_id")
    merchant_id = _identifier(tx.merchant_id, "merchant_id")
    if not tx.merchant_category:
        raise InvalidInputError(_PREFIX + "merchant_category", "is required (4-digit MCC)")
    if not _MCC.fullmatch(tx.merchant_category):
        raise InvalidInputError(
            _PREFIX + "merchant_category", f"{tx.merchant_category[:8]!r} is not a 4-digit MCC"
        )
    if tx.amount_minor <= 0:
        raise InvalidInputError(_PREFIX + "amount_minor", f"must be > 0, got {tx.amount_minor}")
    if tx.amount_minor > MAX_AMOUNT_MINOR:
        raise InvalidInputError(
            _PREFIX + "amount_minor", f"{tx.amount_minor} exceeds the limit {MAX_AMOUNT_MINOR}"
        )
    if not tx.currency:
        raise InvalidInputError(_PREFIX + "currency", "is required (ISO 4217 alpha-3)")
    if tx.currency not in CURRENCY_EXPONENTS:
        raise InvalidInputError(
            _PREFIX + "currency", f"{tx.currency[:8]!r} is not an ISO 4217 currency code"
        )
    country = _country(tx.country, "country")
    if tx.channel == scoring_pb2.CHANNEL_UNSPECIFIED:
        raise InvalidInputError(_PREFIX + "channel", "is required")
    try:
        channel = Channel(tx.channel)
    except ValueError:
        raise InvalidInputError(_PREFIX + "channel", f"unknown value {tx.channel}") from None
    if not MIN_TIMESTAMP_MS <= tx.timestamp_ms <= MAX_TIMESTAMP_MS:
        raise InvalidInputError(
            _PREFIX + "timestamp_ms",
            f"{tx.timestamp_ms} is not unix milliseconds between 2000 and 2100",
        )
    device_id = _identifier(tx.device_id, "device_id", limit=MAX_DEVICE_ID_CHARS, required=False)
    ip_country = _country(tx.ip_country, "ip_country", required=False)
    return Transaction(
        transaction_id=transaction_id,
        card_id=card_id,
        merchant_id=merchant_id,
        merchant_category=tx.merchant_category,
        amount_minor=tx.amount_minor,
        currency=tx.currency,
        country=country,
        channel=channel,
        timestamp_ms=tx.timestamp_ms,
        device_id=device_id,
        ip_country=ip_country,
    )
