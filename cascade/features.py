"""The one feature implementation (feature set ``fs-1``), shared by training and the online path.

This module owns everything between "a transaction plus the card's recent history" and the
float32 tensors the two models read. It is pure: no I/O, no clocks, no randomness. Training replays
a stream through :class:`CardHistories`; the orchestrator reads the same history from Redis (a list
of :func:`encode_history_entry` blobs, newest first, trimmed to :data:`HISTORY_LEN`) and calls the
same two functions, so offline and online values are identical by construction.

A card's stored history follows one rule on both sides (:func:`insert_entry`): a transaction id
enters at most once (the first write wins), entries are ordered by ``(timestamp_ms,
transaction_id)`` newest first whatever order they arrived in, and only the :data:`HISTORY_LEN`
newest are kept. What a transaction's features read of it is :func:`visible_history`: the stored
entries that are not newer than it and are not itself, so a retry, a late arrival or a replay sees
what it would have seen in time order.

Inputs
    ``tx``: the transaction being scored. ``history``: the card's previous transactions, newest
    first, *excluding* ``tx``, at most :data:`HISTORY_LEN` of them. Nothing else is read.

Outputs
    :func:`screening_features` -> ``float32[N_SCREENING_FEATURES]`` for stage 1 (names in
    :data:`SCREENING_FEATURE_NAMES`): the transaction itself, velocity counts and amount sums over
    10 min / 1 h / 24 h / 7 d, time since the last transaction, amount against the card's typical
    amount, new device / country, IP-country mismatch, the share of history at this country, MCC,
    merchant and channel, and how unusual the hour of day is for the card.

    :func:`sequence_tensor` -> ``float32[SEQUENCE_LEN, TOKEN_DIM]`` for stage 2 (channel names in
    :data:`TOKEN_FEATURE_NAMES`): one token per history entry, oldest first, then the current
    transaction at the last position; left-padded with zero tokens; channel 0 is 1.0 for a real
    position and 0.0 for padding.

Amounts are read in major units (:func:`cascade.iso_codes.to_major_units`) and then put on a
rough common scale with a fixed per-currency table (:data:`APPROX_USD_PER_UNIT`; unknown
currencies in ISO 4217 count 1:1). The table is part of the feature-set version: change it, bump
:data:`FEATURE_SET_VERSION`. Hours are UTC; what matters is the deviation from the card's own
rhythm.
"""

from __future__ import annotations

import math
import struct
from typing import TYPE_CHECKING, Final, NamedTuple

import numpy as np

from cascade.iso_codes import CURRENCY_EXPONENTS, to_major_units
from cascade.transaction import Channel, Transaction

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from numpy.typing import NDArray

__all__ = [
    "APPROX_USD_PER_UNIT",
    "FEATURE_SET_VERSION",
    "HISTORY_LEN",
    "MCC_GROUPS",
    "N_SCREENING_FEATURES",
    "SCREENING_FEATURE_NAMES",
    "SEQUENCE_LEN",
    "TOKEN_DIM",
    "TOKEN_FEATURE_NAMES",
    "CardHistories",
    "HistoryEntry",
    "decode_history_entries",
    "decode_history_entry",
    "encode_history_entry",
    "history_entry",
    "insert_entry",
    "mcc_group",
    "screening_features",
    "sequence_tensor",
    "visible_history",
]

FEATURE_SET_VERSION: Final[str] = "fs-1"
HISTORY_LEN: Final[int] = 64
SEQUENCE_LEN: Final[int] = HISTORY_LEN + 1

# Rough USD value of one major unit. Only orders of magnitude matter to the models.
APPROX_USD_PER_UNIT: Final[dict[str, float]] = {
    "USD": 1.0, "EUR": 1.08, "GBP": 1.27, "CHF": 1.12, "JPY": 0.0067, "CNY": 0.14,
    "CAD": 0.73, "AUD": 0.66, "NZD": 0.61, "SEK": 0.095, "NOK": 0.094, "DKK": 0.145,
    "PLN": 0.25, "CZK": 0.044, "HUF": 0.0028, "RON": 0.22, "TRY": 0.031, "RUB": 0.011,
    "INR": 0.012, "SGD": 0.74, "HKD": 0.128, "KRW": 0.00074, "TWD": 0.031, "THB": 0.028,
    "MYR": 0.21, "IDR": 0.000063, "PHP": 0.018, "VND": 0.00004, "AED": 0.27, "SAR": 0.27,
    "ILS": 0.27, "ZAR": 0.054, "NGN": 0.00065, "KES": 0.0077, "EGP": 0.021, "BRL": 0.19,
    "MXN": 0.055, "ARS": 0.0011, "CLP": 0.0011, "COP": 0.00025, "PEN": 0.27,
}  # fmt: skip

# Merchant category codes folded into coarse groups; anything unlisted is "other".
MCC_GROUPS: Final[tuple[tuple[str, frozenset[str]], ...]] = (
    ("grocery", frozenset({"5411", "5422", "5441", "5451", "5462", "5499"})),
    ("dining", frozenset({"5811", "5812", "5813", "5814"})),
    ("transport", frozenset({"4111", "4121", "4131", "5541", "5542", "7523", "4784"})),
    ("travel", frozenset({"4511", "4722", "7011", "3000", "3001", "3005", "3501", "7512"})),
    ("retail", frozenset({"5200", "5310", "5311", "5651", "5691", "5699", "5912", "5942", "5999"})),
    ("digital", frozenset({"4814", "4899", "5815", "5816", "5817", "5818"})),
    ("high_risk_goods", frozenset({"5045", "5094", "5732", "5734", "5944", "5947"})),
    ("cash_like", frozenset({"4829", "6010", "6011", "6051", "6540", "7995"})),
)
_N_MCC_GROUPS: Final = len(MCC_GROUPS) + 1  # + "other"
_MCC_OTHER: Final = _N_MCC_GROUPS - 1
_MCC_GROUP_INDEX: Final[dict[str, int]] = {
    mcc: i for i, (_, codes) in enumerate(MCC_GROUPS) for mcc in codes
}
# One minor unit of each ISO 4217 currency on the common scale, resolved once for speed.
_USD_PER_MINOR_UNIT: Final[dict[str, float]] = {
    code: to_major_units(1, code) * APPROX_USD_PER_UNIT.get(code, 1.0)
    for code in CURRENCY_EXPONENTS
}
_MCC_GROUP_NAMES: Final[tuple[str, ...]] = (*(name for name, _ in MCC_GROUPS), "other")
_CHANNELS: Final = tuple(Channel)
_CHANNEL_INDEX: Final[dict[Channel, int]] = {c: i for i, c in enumerate(_CHANNELS)}

SCREENING_FEATURE_NAMES: Final[tuple[str, ...]] = (
    "amount_log_usd",
    "amount_small",
    "hour_sin",
    "hour_cos",
    *(f"channel_{c.name.lower()}" for c in _CHANNELS),
    *(f"mcc_{g}" for g in _MCC_GROUP_NAMES),
    "history_count",
    "log_secs_since_last",
    "count_10m",
    "count_1h",
    "count_24h",
    "count_7d",
    "sum_log_usd_1h",
    "sum_log_usd_24h",
    "small_count_1h",
    "small_count_24h",
    "distinct_merchants_1h",
    "amount_log_ratio_median",
    "amount_zscore",
    "amount_log_ratio_max",
    "device_empty",
    "device_new",
    "distinct_devices_24h",
    "country_new",
    "country_share",
    "last_country_differs",
    "log_secs_since_other_country",
    "ip_country_mismatch",
    "ip_country_new",
    "merchant_share",
    "mcc_share",
    "channel_share",
    "hour_deviation",
    "hour_concentration",
)
N_SCREENING_FEATURES: Final[int] = len(SCREENING_FEATURE_NAMES)

TOKEN_FEATURE_NAMES: Final[tuple[str, ...]] = (
    "real",
    "amount_log_usd",
    "amount_log_ratio_median",
    "amount_small",
    "log_secs_since_prev",
    "log_secs_before_current",
    "hour_sin",
    "hour_cos",
    *(f"channel_{c.name.lower()}" for c in _CHANNELS),
    *(f"mcc_{g}" for g in _MCC_GROUP_NAMES),
    "same_country_as_current",
    "home_country",
    "ip_country_mismatch",
    "same_device_as_current",
    "device_empty",
    "same_merchant_as_current",
    "same_mcc_as_current",
    "first_seen_device",
    "first_seen_country",
    "is_current",
)
TOKEN_DIM: Final[int] = len(TOKEN_FEATURE_NAMES)

_SMALL_USD: Final = 5.0
_LOG1P_SMALL: Final = math.log1p(_SMALL_USD)
_MS_10M: Final = 600_000
_MS_1H: Final = 3_600_000
_MS_24H: Final = 86_400_000
_MS_7D: Final = 7 * _MS_24H
# log1p of 90 days in seconds: "never" for time-since features.
_NEVER_LOG_SECS: Final = math.log1p(90 * 86_400.0)
_TWO_PI: Final = 2.0 * math.pi

_ENCODING_VERSION: Final = 2
# Big-endian, so the timestamp sits at a fixed offset a Redis script can read (bytes 1..8).
_HEAD: Final = struct.Struct(">BqqB")
_SEPARATOR: Final = "\x1f"
_CHANNEL_BY_VALUE: Final[dict[int, Channel]] = {c.value: c for c in Channel}


class HistoryEntry(NamedTuple):
    """What the online store keeps per past transaction of a card (all the features read).

    A named tuple rather than a frozen dataclass: the online path decodes 64 of these per
    transaction scored, which took 95 us as dataclasses and takes 42 us as tuples. The features
    never read ``transaction_id``: it makes an entry unique in its card's history.
    """

    transaction_id: str
    timestamp_ms: int
    amount_minor: int
    currency: str
    merchant_id: str
    merchant_category: str
    country: str
    channel: Channel
    device_id: str = ""
    ip_country: str = ""


def history_entry(tx: Transaction) -> HistoryEntry:
    """The history entry to store for ``tx`` once it has been scored."""
    return HistoryEntry(
        transaction_id=tx.transaction_id,
        timestamp_ms=tx.timestamp_ms,
        amount_minor=tx.amount_minor,
        currency=tx.currency,
        merchant_id=tx.merchant_id,
        merchant_category=tx.merchant_category,
        country=tx.country,
        channel=tx.channel,
        device_id=tx.device_id,
        ip_country=tx.ip_country,
    )


def encode_history_entry(entry: HistoryEntry) -> bytes:
    """Compact, deterministic bytes for ``entry``.

    Layout (version 2): the version byte, timestamp and amount as big-endian int64, the channel
    byte, then the seven strings, transaction id first, UTF-8 encoded and joined by the unit
    separator ``0x1f`` (which no field may contain: ``ValueError``). The Redis write script reads
    the timestamp at bytes 1..8 and the transaction id from byte 18 to the first separator
    (:mod:`orchestrator.online_store`): change the layout, change the script and the key prefix.
    """
    texts = (
        entry.transaction_id,
        entry.currency,
        entry.merchant_id,
        entry.merchant_category,
        entry.country,
        entry.device_id,
        entry.ip_country,
    )
    joined = _SEPARATOR.join(texts)
    if joined.count(_SEPARATOR) != len(texts) - 1:
        raise ValueError("history-entry fields must not contain the 0x1f separator")
    head = _HEAD.pack(_ENCODING_VERSION, entry.timestamp_ms, entry.amount_minor, entry.channel)
    return head + joined.encode()


def decode_history_entries(raw: Iterable[bytes]) -> tuple[list[HistoryEntry], int]:
    """Inverse of :func:`encode_history_entry` for many entries at once: those that decode, in
    order, and how many did not (each of those :func:`decode_history_entry` refuses).

    The online path decodes a card's whole stored history (64 entries) per transaction scored,
    so the loop is written out here, with no call per entry but the C ones: 38 against 52 us per
    64 entries when it called :func:`decode_history_entry` for each.
    """
    entries: list[HistoryEntry] = []
    append = entries.append
    unpack = _HEAD.unpack_from
    head_size = _HEAD.size
    channels = _CHANNEL_BY_VALUE
    new_tuple = tuple.__new__
    separator = _SEPARATOR
    refused = 0
    for data in raw:
        try:
            version, timestamp_ms, amount_minor, channel_value = unpack(data, 0)
            # UnicodeDecodeError is a ValueError; so is a field count other than seven.
            transaction_id, currency, merchant_id, merchant_category, country, device_id, ip = (
                data[head_size:].decode().split(separator)
            )
            channel = channels[channel_value]
        except (struct.error, ValueError, KeyError):
            refused += 1
            continue
        if version != _ENCODING_VERSION:
            refused += 1
            continue
        append(
            new_tuple(
                HistoryEntry,
                (
                    transaction_id,
                    timestamp_ms,
                    amount_minor,
                    currency,
                    merchant_id,
                    merchant_category,
                    country,
                    channel,
                    device_id,
                    ip,
                ),
            )
        )
    return entries, refused


def decode_history_entry(data: bytes) -> HistoryEntry:
    """Inverse of :func:`encode_history_entry`; raises ``ValueError`` naming what is malformed."""
    entries, refused = decode_history_entries((data,))
    if not refused:
        return entries[0]
    try:
        version, _, _, channel_value = _HEAD.unpack_from(data, 0)
    except struct.error as exc:
        raise ValueError(f"malformed history entry: {exc}") from exc
    if version != _ENCODING_VERSION:
        raise ValueError(f"unknown history-entry encoding version {version}")
    if channel_value not in _CHANNEL_BY_VALUE:
        raise ValueError(f"unknown channel {channel_value} in history entry")
    texts = data[_HEAD.size :].decode().split(_SEPARATOR)  # UnicodeDecodeError is a ValueError
    raise ValueError(f"history entry has {len(texts)} text fields, expected 7")


def insert_entry(entries: list[HistoryEntry], entry: HistoryEntry) -> bool:
    """Add ``entry`` to a card's stored history ``entries`` (newest first), in place, by the one
    rule the Redis store applies too: nothing happens when its transaction id is already there;
    otherwise it goes where ``(timestamp_ms, transaction_id)`` puts it, newest first, and only the
    :data:`HISTORY_LEN` newest entries stay. Returns whether ``entry`` was added."""
    transaction_id = entry.transaction_id
    key = (entry.timestamp_ms, transaction_id)
    position = -1
    for i, stored in enumerate(entries):
        if stored.transaction_id == transaction_id:
            return False
        if position < 0 and (stored.timestamp_ms, stored.transaction_id) < key:
            position = i
    if position < 0:
        if len(entries) >= HISTORY_LEN:
            return False
        entries.append(entry)
        return True
    entries.insert(position, entry)
    del entries[HISTORY_LEN:]
    return True


def visible_history(tx: Transaction, entries: Sequence[HistoryEntry]) -> Sequence[HistoryEntry]:
    """What ``tx``'s features read of its card's stored history ``entries`` (newest first): the
    entries not newer than ``tx`` and other than ``tx`` itself (so a retry whose own entry was
    already written sees what its first attempt saw). ``entries`` itself when nothing is left
    out, which is the usual case and costs no copy."""
    timestamp_ms = tx.timestamp_ms
    transaction_id = tx.transaction_id
    for entry in entries:
        if entry.timestamp_ms > timestamp_ms or entry.transaction_id == transaction_id:
            break
    else:
        return entries
    return [
        e for e in entries if e.timestamp_ms <= timestamp_ms and e.transaction_id != transaction_id
    ]


def mcc_group(merchant_category: str) -> int:
    """Index of the coarse group of a merchant category code (the last index is "other")."""
    return _MCC_GROUP_INDEX.get(merchant_category, _MCC_OTHER)


def _amount_usd(amount_minor: int, currency: str) -> float:
    """Amount on the common scale (KeyError for a currency not in ISO 4217: validate first)."""
    return amount_minor * _USD_PER_MINOR_UNIT[currency]


def _hour_angle(timestamp_ms: int) -> float:
    return (timestamp_ms % _MS_24H) / _MS_24H * _TWO_PI


def screening_features(tx: Transaction, history: Sequence[HistoryEntry]) -> NDArray[np.float32]:
    """Stage-1 features of ``tx`` given the card's ``history`` (newest first, excluding ``tx``).

    Returns ``float32[N_SCREENING_FEATURES]`` in the order of :data:`SCREENING_FEATURE_NAMES`.
    """
    out = np.zeros(N_SCREENING_FEATURES, dtype=np.float32)
    _fill_screening(out, tx, history)
    return out


def _fill_screening(
    out: NDArray[np.float32], tx: Transaction, history: Sequence[HistoryEntry]
) -> None:
    history = history[:HISTORY_LEN]
    now = tx.timestamp_ms
    amount = _amount_usd(tx.amount_minor, tx.currency)
    log_amount = math.log1p(amount)
    angle = _hour_angle(now)
    hour_sin = math.sin(angle)
    hour_cos = math.cos(angle)

    # One pass over the history (newest first) for every window statistic.
    n = len(history)
    count_10m = count_1h = count_24h = count_7d = 0
    sum_1h = sum_24h = 0.0
    small_1h = small_24h = 0
    merchants_1h: set[str] = set()
    devices_24h: set[str] = set()
    devices: set[str] = set()
    countries: set[str] = set()
    ip_countries: set[str] = set()
    same_country = same_merchant = same_mcc = same_channel = 0
    since_other_country_ms = -1
    log_amounts: list[float] = []
    sin_sum = cos_sum = 0.0
    usd_per_minor = _USD_PER_MINOR_UNIT  # locals: this loop is the online hot path
    day_ms = _MS_24H
    two_pi = _TWO_PI
    for entry in history:
        age_ms = now - entry.timestamp_ms
        entry_amount = entry.amount_minor * usd_per_minor[entry.currency]
        log_amounts.append(math.log1p(entry_amount))
        if age_ms <= _MS_7D:
            count_7d += 1
            if age_ms <= _MS_24H:
                count_24h += 1
                sum_24h += entry_amount
                devices_24h.add(entry.device_id)
                if entry_amount < _SMALL_USD:
                    small_24h += 1
                if age_ms <= _MS_1H:
                    count_1h += 1
                    sum_1h += entry_amount
                    merchants_1h.add(entry.merchant_id)
                    if entry_amount < _SMALL_USD:
                        small_1h += 1
                    if age_ms <= _MS_10M:
                        count_10m += 1
        devices.add(entry.device_id)
        countries.add(entry.country)
        ip_countries.add(entry.ip_country)
        if entry.country == tx.country:
            same_country += 1
        elif since_other_country_ms < 0:
            since_other_country_ms = age_ms
        if entry.merchant_id == tx.merchant_id:
            same_merchant += 1
        if entry.merchant_category == tx.merchant_category:
            same_mcc += 1
        if entry.channel == tx.channel:
            same_channel += 1
        entry_angle = (entry.timestamp_ms % day_ms) / day_ms * two_pi
        sin_sum += math.sin(entry_angle)
        cos_sum += math.cos(entry_angle)

    out[0] = log_amount
    out[1] = amount < _SMALL_USD
    out[2] = hour_sin
    out[3] = hour_cos
    i = 4
    out[i + _CHANNEL_INDEX[tx.channel]] = 1.0
    i += len(_CHANNELS)
    out[i + mcc_group(tx.merchant_category)] = 1.0
    i += _N_MCC_GROUPS
    device_empty = tx.device_id == ""
    ip_mismatch = tx.ip_country != "" and tx.ip_country != tx.country
    if n == 0:
        out[i : i + 2] = (0.0, _NEVER_LOG_SECS)
        i += 11  # counts, sums and distinct merchants stay 0
        ratio_median = zscore = ratio_max = 0.0
        device_new = not device_empty
        country_new = True
        country_share = merchant_share = mcc_share = channel_share = 0.0
        last_differs = False
        since_other = _NEVER_LOG_SECS
        ip_new = tx.ip_country != ""
        hour_deviation = hour_concentration = 0.0
        distinct_devices = 0
    else:
        secs_since_last = max(now - history[0].timestamp_ms, 0) / 1000.0
        out[i] = n / HISTORY_LEN
        out[i + 1] = math.log1p(secs_since_last)
        out[i + 2] = count_10m
        out[i + 3] = count_1h
        out[i + 4] = count_24h
        out[i + 5] = count_7d
        out[i + 6] = math.log1p(sum_1h)
        out[i + 7] = math.log1p(sum_24h)
        out[i + 8] = small_1h
        out[i + 9] = small_24h
        out[i + 10] = len(merchants_1h)
        i += 11
        ordered = sorted(log_amounts)
        median = ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])
        mean = sum(log_amounts) / n
        var = sum((x - mean) ** 2 for x in log_amounts) / n
        ratio_median = log_amount - median
        zscore = (log_amount - mean) / math.sqrt(var + 0.25)
        ratio_max = log_amount - ordered[-1]
        device_new = not device_empty and tx.device_id not in devices
        country_new = tx.country not in countries
        country_share = same_country / n
        merchant_share = same_merchant / n
        mcc_share = same_mcc / n
        channel_share = same_channel / n
        last_differs = history[0].country != tx.country
        since_other = (
            math.log1p(max(since_other_country_ms, 0) / 1000.0)
            if since_other_country_ms >= 0
            else _NEVER_LOG_SECS
        )
        ip_new = tx.ip_country != "" and tx.ip_country not in ip_countries
        mean_sin = sin_sum / n
        mean_cos = cos_sum / n
        hour_concentration = math.hypot(mean_sin, mean_cos)
        hour_deviation = hour_concentration - (hour_sin * mean_sin + hour_cos * mean_cos)
        distinct_devices = len(devices_24h - {""})
    out[i] = ratio_median
    out[i + 1] = zscore
    out[i + 2] = ratio_max
    out[i + 3] = device_empty
    out[i + 4] = device_new
    out[i + 5] = distinct_devices
    out[i + 6] = country_new
    out[i + 7] = country_share
    out[i + 8] = last_differs
    out[i + 9] = since_other
    out[i + 10] = ip_mismatch
    out[i + 11] = ip_new
    out[i + 12] = merchant_share
    out[i + 13] = mcc_share
    out[i + 14] = channel_share
    out[i + 15] = hour_deviation
    out[i + 16] = hour_concentration


# Token channel offsets, resolved once.
_T: Final[dict[str, int]] = {name: i for i, name in enumerate(TOKEN_FEATURE_NAMES)}
_T_CHANNEL0: Final = _T[f"channel_{_CHANNELS[0].name.lower()}"]
_T_MCC0: Final = _T[f"mcc_{_MCC_GROUP_NAMES[0]}"]
_T_SAME_COUNTRY: Final = _T["same_country_as_current"]
_T_HOME: Final = _T["home_country"]
_T_IP_MISMATCH: Final = _T["ip_country_mismatch"]
_T_SAME_DEVICE: Final = _T["same_device_as_current"]
_T_DEVICE_EMPTY: Final = _T["device_empty"]
_T_SAME_MERCHANT: Final = _T["same_merchant_as_current"]
_T_SAME_MCC: Final = _T["same_mcc_as_current"]
_T_FIRST_DEVICE: Final = _T["first_seen_device"]
_T_FIRST_COUNTRY: Final = _T["first_seen_country"]
# Token scaling: log amounts / 8, log seconds / 16 keep channels roughly in [-2, 2].
_AMOUNT_SCALE: Final = 1.0 / 8.0
_SECS_SCALE: Final = 1.0 / 16.0


def sequence_tensor(tx: Transaction, history: Sequence[HistoryEntry]) -> NDArray[np.float32]:
    """Stage-2 input: ``float32[SEQUENCE_LEN, TOKEN_DIM]`` for ``tx`` and its ``history``.

    ``history`` is newest first and excludes ``tx``; entries beyond :data:`HISTORY_LEN` are
    ignored. Tokens run oldest to newest, left-padded with zeros; ``tx`` is the last token.
    """
    out = np.zeros((SEQUENCE_LEN, TOKEN_DIM), dtype=np.float32)
    kept = history[:HISTORY_LEN]
    n = len(kept)
    items: list[HistoryEntry | Transaction] = [*reversed(kept), tx]
    block = out[SEQUENCE_LEN - 1 - n :]
    rows = np.arange(n + 1)

    usd_per_minor = _USD_PER_MINOR_UNIT
    amounts = [math.log1p(e.amount_minor * usd_per_minor[e.currency]) for e in items]
    countries = [e.country for e in items]
    if n:
        ordered = sorted(amounts[:-1])
        median = ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])
        # the card's most frequent country; ties go to the most recent one
        history_countries = countries[n - 1 :: -1]
        home = max(dict.fromkeys(history_countries), key=history_countries.count)
    else:
        median = amounts[-1]
        home = tx.country
    log_amount = np.array(amounts)
    block[:, 0] = 1.0
    block[:, 1] = log_amount * _AMOUNT_SCALE
    block[:, 2] = log_amount - median
    block[:, 3] = log_amount < _LOG1P_SMALL

    ts = np.array([e.timestamp_ms for e in items], dtype=np.int64)
    block[0, 4] = 1.0
    block[1:, 4] = np.log1p(np.maximum(np.diff(ts), 0) / 1000.0) * _SECS_SCALE
    block[:, 5] = np.log1p(np.maximum(tx.timestamp_ms - ts, 0) / 1000.0) * _SECS_SCALE
    angle = (ts % _MS_24H) * (_TWO_PI / _MS_24H)
    block[:, 6] = np.sin(angle)
    block[:, 7] = np.cos(angle)

    one_hot = [_T_CHANNEL0 + _CHANNEL_INDEX[e.channel] for e in items]
    one_hot += [_T_MCC0 + _MCC_GROUP_INDEX.get(e.merchant_category, _MCC_OTHER) for e in items]
    block[np.r_[rows, rows], one_hot] = 1.0
    devices = [e.device_id for e in items]
    block[:, _T_SAME_COUNTRY] = [c == tx.country for c in countries]
    block[:, _T_HOME] = [c == home for c in countries]
    block[:, _T_IP_MISMATCH] = [e.ip_country not in ("", e.country) for e in items]
    block[:, _T_SAME_DEVICE] = [d != "" and d == tx.device_id for d in devices]
    block[:, _T_DEVICE_EMPTY] = [d == "" for d in devices]
    block[:, _T_SAME_MERCHANT] = [e.merchant_id == tx.merchant_id for e in items]
    block[:, _T_SAME_MCC] = [e.merchant_category == tx.merchant_category for e in items]
    block[:, _T_FIRST_DEVICE] = _first_seen(devices, skip_empty=True)
    block[:, _T_FIRST_COUNTRY] = _first_seen(countries, skip_empty=False)
    out[-1, -1] = 1.0
    return out


def _first_seen(values: list[str], *, skip_empty: bool) -> list[bool]:
    """For each position, whether its value is absent from every earlier position."""
    seen: set[str] = set()
    flags: list[bool] = []
    for value in values:
        flags.append(value not in seen and not (skip_empty and value == ""))
        seen.add(value)
    return flags


class CardHistories:
    """Offline replay helper: each card's stored history, by the online store's rule.

    Replay a stream by calling :meth:`history_for` (what the transaction being scored reads) and
    then :meth:`append` (the transaction joins its card's history), exactly the order the
    orchestrator uses against Redis (read, score, then the write script). Both follow the same
    rule as the store (:func:`insert_entry`, :func:`visible_history`), so a stream that arrives out
    of order, with duplicates or retries, gives the online values too.
    """

    __slots__ = ("_cards",)

    def __init__(self) -> None:
        self._cards: dict[str, list[HistoryEntry]] = {}

    def history(self, card_id: str) -> list[HistoryEntry]:
        """The card's stored entries, newest first (empty for an unseen card)."""
        entries = self._cards.get(card_id)
        return list(entries) if entries is not None else []

    def history_for(self, tx: Transaction) -> list[HistoryEntry]:
        """What ``tx``'s features read: its card's stored entries not newer than it, without
        itself (:func:`visible_history`), newest first."""
        return list(visible_history(tx, self._cards.get(tx.card_id, ())))

    def append(self, tx: Transaction) -> bool:
        """Record ``tx`` in its card's history (:func:`insert_entry`); whether it was added."""
        entries = self._cards.get(tx.card_id)
        if entries is None:
            entries = self._cards[tx.card_id] = []
        return insert_entry(entries, history_entry(tx))

    def __len__(self) -> int:
        return len(self._cards)
