"""A seeded simulator of card transactions with labelled fraud, and its replayable stream format.

This module owns the synthetic data every model is trained and evaluated on, and the stream file
the load tests replay. Same :class:`SimulationConfig` (seed included) -> byte-identical stream.

Generative process
==================
World
    Sixteen countries with a currency, a UTC offset and a region (NA, LATAM, EU, APAC, ME), weighted
    by how many cardholders live there, plus a few countries that only fraudsters' IPs come from.
    Each country has card-present merchants (count proportional to its weight); a pool of global
    e-commerce merchants sits in US / GB / NL / IE. A merchant has a merchant category code (MCC),
    a typical amount (log-normal around the MCC's median) and a Zipf-like popularity.

Cardholders (legitimate behaviour)
    Each card has a home country, an activity rate (gamma, mean ~1.2 transactions a day), a daily
    rhythm (local hour ~ Normal(peak, spread), 5% at any hour), a spending multiplier
    (log-normal), up to 14 favourite local merchants and up to 5 favourite online ones, an online
    share (Beta(2, 5)), a contactless preference, and one or two devices used online.
    Transactions: 80% at favourites, otherwise a random merchant of the same kind; amount =
    merchant typical x card multiplier x log-normal noise; card-present merchants give
    CARD_PRESENT or CONTACTLESS (ATM for MCC 6011), online ones ECOMMERCE with one of the card's
    devices (none for guest checkouts and fingerprint-blocking browsers, see ``sim-3`` below) and
    the buyer's IP country (the home country, or a random one for the 3% of cards on a VPN); 30% of taxi, hotel and airline bookings are MAIL_PHONE_ORDER (no device, no IP).
    Up to three subscriptions bill monthly as RECURRING. Legitimate noise that looks like
    fraud on purpose: 25% of cards take a trip (2-10 days in another country, card-present there,
    after a flight-length gap), 6% switch to a new phone (a new device from then on), online
    merchants abroad (country != IP country), small transit fares, occasional big purchases.

Fraud patterns (labelled per transaction, each on a victim card after a 14-day warm-up)
    ``card_testing``
        3-10 tiny online charges (0.5-3 USD) at random digital merchants seconds apart from a new
        device and a foreign IP; in 60% of cases 1-3 large electronics charges follow within an
        hour. Revealed by velocity and small-amount counts: per-transaction aggregates see it.
    ``account_takeover``
        A new device, usually a foreign IP, 2-6 online purchases of electronics, gift cards or
        money transfers at 3-12x the card's typical amount within two days. Revealed by new
        device + IP mismatch + amount ratio.
    ``impossible_travel``
        A cloned card used in person in another region 20 min-4 h after a genuine in-person
        transaction at home; 1-4 purchases or ATM withdrawals. Revealed by the country change
        against the time since the last transaction.
    ``compromised_merchant``
        A few popular local merchants host a skimmer for a while; 30% of cards used there get
        cloned and, 2-20 days later, spent at home, in person, at merchants the card never used,
        at night (local 22:00-05:00), at 1.5-5x its typical amount or as ATM cash. Subtle per
        transaction (hour deviation, new merchant); clearer as a run.
    ``enrolled_device``
        A fraudster enrols a new device with one modest online purchase from an IP in the card's
        own country, waits 2-8 days, then makes 2-5 online purchases at 2-5x the typical amount
        with that device. At that point the device is no longer new and nothing is foreign: only
        the sequence (a device first seen days ago, used only for these purchases, while the card's
        own device keeps being used) reveals it.
    The victims' genuine activity continues alongside. Victim shares are tuned for a transaction
    fraud rate of about 0.3-0.6%.

Versions
    ``sim-1`` picked card-testing merchants in an order that depended on ``PYTHONHASHSEED`` (the
    models ``s1-1`` / ``s2-1`` were trained on it); ``sim-2`` is the same process with that order
    fixed, so a seed now gives the same stream in every process. ``sim-3`` removes sim-2's one
    perfectly separating rule: there, genuine online purchases always carried a device, so an
    online purchase without one was always fraud (30% of card-testing runs have none). Now 2% of
    any card's online purchases are guest checkouts without a device, and 8% of cardholders block
    fingerprinting, so 60% of their online purchases carry none (about 6.6% of genuine online
    purchases in all).

Stream format
    gzip-compressed JSON lines, sorted by ``timestamp_ms`` (ties by transaction id). Each line holds
    the :class:`~cascade.transaction.Transaction` fields (``channel`` by name) plus ``is_fraud``
    (bool) and ``pattern`` (``""`` for genuine transactions). See :func:`write_stream` and
    :func:`read_stream`.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import random
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Final

from cascade.features import APPROX_USD_PER_UNIT
from cascade.iso_codes import minor_unit_exponent
from cascade.transaction import Channel, Transaction

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence
    from pathlib import Path

__all__ = [
    "SIMULATOR_VERSION",
    "FraudPattern",
    "LabelledTransaction",
    "SimulationConfig",
    "read_stream",
    "simulate",
    "write_stream",
]

logger = logging.getLogger(__name__)

SIMULATOR_VERSION: Final[str] = "sim-3"

_MS_MINUTE: Final = 60_000
_MS_HOUR: Final = 3_600_000
_MS_DAY: Final = 86_400_000
_WARMUP_DAYS: Final = 14


class FraudPattern(StrEnum):
    """The labelled kinds of fraud the simulator produces."""

    CARD_TESTING = "card_testing"
    ACCOUNT_TAKEOVER = "account_takeover"
    IMPOSSIBLE_TRAVEL = "impossible_travel"
    COMPROMISED_MERCHANT = "compromised_merchant"
    ENROLLED_DEVICE = "enrolled_device"


@dataclass(frozen=True, slots=True)
class SimulationConfig:
    """Everything that determines a simulated stream."""

    seed: int = 7
    n_cards: int = 8000
    n_days: int = 90
    start_ms: int = 1_767_225_600_000  # 2026-01-01T00:00:00Z
    card_testing_share: float = 0.022
    account_takeover_share: float = 0.022
    impossible_travel_share: float = 0.022
    enrolled_device_share: float = 0.022
    compromised_merchants_per_month: int = 4
    compromised_clone_probability: float = 0.3
    # Genuine online purchases without a device id: guest checkouts on any card, and most online
    # purchases of cards whose owner's browser blocks fingerprinting. Without them an online
    # purchase with no device would be fraud every time (sim-2's separating rule).
    guest_checkout_share: float = 0.02
    fingerprint_blocked_share: float = 0.08
    fingerprint_blocked_online_share: float = 0.6


@dataclass(frozen=True, slots=True)
class LabelledTransaction:
    """A simulated transaction with its ground truth."""

    tx: Transaction
    is_fraud: bool
    pattern: str = ""


# --- the world -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Country:
    code: str
    currency: str
    utc_offset_h: float
    region: str
    weight: float


_COUNTRIES: Final = (
    _Country("US", "USD", -5, "NA", 0.28),
    _Country("CA", "CAD", -5, "NA", 0.05),
    _Country("MX", "MXN", -6, "LATAM", 0.04),
    _Country("BR", "BRL", -3, "LATAM", 0.05),
    _Country("GB", "GBP", 0, "EU", 0.10),
    _Country("DE", "EUR", 1, "EU", 0.08),
    _Country("FR", "EUR", 1, "EU", 0.07),
    _Country("ES", "EUR", 1, "EU", 0.04),
    _Country("IT", "EUR", 1, "EU", 0.04),
    _Country("NL", "EUR", 1, "EU", 0.03),
    _Country("PL", "PLN", 1, "EU", 0.03),
    _Country("JP", "JPY", 9, "APAC", 0.06),
    _Country("SG", "SGD", 8, "APAC", 0.02),
    _Country("AU", "AUD", 10, "APAC", 0.04),
    _Country("IN", "INR", 5.5, "APAC", 0.05),
    _Country("AE", "AED", 4, "ME", 0.02),
)
_COUNTRY: Final = {c.code: c for c in _COUNTRIES}
# IP countries seen only from fraudsters (besides ordinary ones).
_FRAUD_ONLY_IP: Final = ("RU", "NG", "UA", "VN", "ID", "RO")
_ECOM_HUBS: Final = ("US", "GB", "NL", "IE")
_IE: Final = _Country("IE", "EUR", 0, "EU", 0.0)


@dataclass(frozen=True, slots=True)
class _Category:
    mcc: str
    median_usd: float
    sigma: float
    online: bool
    in_person: bool
    weight: float


# Everyday categories (weight = share of a card's purchases) and fraud-favoured ones (weight 0:
# still bought legitimately now and then through the "big purchase" branch).
_CATEGORIES: Final = (
    _Category("5411", 45.0, 0.6, False, True, 0.20),
    _Category("5499", 12.0, 0.6, False, True, 0.06),
    _Category("5812", 35.0, 0.5, False, True, 0.10),
    _Category("5814", 9.0, 0.4, False, True, 0.08),
    _Category("5813", 30.0, 0.5, False, True, 0.03),
    _Category("5541", 45.0, 0.4, False, True, 0.06),
    _Category("4111", 3.0, 0.3, False, True, 0.06),
    _Category("4121", 18.0, 0.5, True, True, 0.03),
    _Category("5311", 60.0, 0.8, True, True, 0.06),
    _Category("5651", 70.0, 0.7, True, True, 0.05),
    _Category("5912", 20.0, 0.6, False, True, 0.04),
    _Category("5999", 30.0, 0.9, True, True, 0.05),
    _Category("5815", 8.0, 0.5, True, False, 0.04),
    _Category("5816", 15.0, 0.8, True, False, 0.02),
    _Category("6011", 120.0, 0.6, False, True, 0.04),
    _Category("7011", 180.0, 0.6, True, True, 0.01),
    _Category("4511", 350.0, 0.6, True, False, 0.01),
    _Category("5732", 250.0, 0.9, True, True, 0.02),
    _Category("5944", 300.0, 1.0, False, True, 0.005),
    _Category("5045", 600.0, 0.7, True, False, 0.005),
    _Category("4829", 200.0, 0.8, True, False, 0.005),
)
_CATEGORY: Final = {c.mcc: c for c in _CATEGORIES}
_SUBSCRIPTION_MCCS: Final = (("4899", 13.0), ("4814", 40.0), ("5815", 10.0))
_PHONE_ORDER_MCCS: Final = frozenset({"7011", "4511", "4121"})
# Tuples, not sets: iteration order must not depend on PYTHONHASHSEED (replayable streams).
_TESTING_MCCS: Final = ("5815", "5816", "5999")


@dataclass(slots=True)
class _Merchant:
    merchant_id: str
    country: _Country
    category: _Category
    online: bool
    typical_usd: float
    popularity: float


@dataclass(slots=True)
class _Card:
    card_id: str
    home: _Country
    rate_per_day: float
    peak_hour: float
    hour_spread: float
    spend: float
    online_share: float
    contactless: float
    devices: list[str]
    no_device_share: float
    vpn: bool
    local_favourites: list[_Merchant]
    online_favourites: list[_Merchant]
    subscriptions: list[tuple[_Merchant, float, int]]
    device_switch_ms: int | None = None
    trip: tuple[int, int, _Country] | None = None
    events: list[_Event] = field(default_factory=list)


@dataclass(slots=True)
class _Event:
    """One simulated transaction before it gets an id."""

    ts: int
    card: _Card
    merchant: _Merchant
    amount_usd: float
    channel: Channel
    device: str
    ip_country: str
    pattern: str = ""


class _World:
    """Merchants and lookups shared by every card."""

    def __init__(self, rng: random.Random) -> None:
        self.local: dict[str, list[_Merchant]] = {}
        self.local_weights: dict[str, list[float]] = {}
        self.online: list[_Merchant] = []
        counter = 0

        def make(country: _Country, category: _Category, online: bool) -> _Merchant:
            nonlocal counter
            counter += 1
            return _Merchant(
                merchant_id=f"m{counter:05d}-{country.code}",
                country=country,
                category=category,
                online=online,
                typical_usd=category.median_usd * rng.lognormvariate(0.0, 0.3),
                popularity=1.0 / (1 + rng.random() * 20),
            )

        in_person = [c for c in _CATEGORIES if c.in_person]
        in_person_w = [max(c.weight, 0.004) for c in in_person]
        for country in _COUNTRIES:
            count = int(40 + 900 * country.weight)
            cats = rng.choices(in_person, weights=in_person_w, k=count)
            merchants = [make(country, cat, False) for cat in cats]
            self.local[country.code] = merchants
            self.local_weights[country.code] = [m.popularity for m in merchants]
        online_cats = [c for c in _CATEGORIES if c.online]
        online_w = [max(c.weight, 0.01) for c in online_cats]
        hubs = [_COUNTRY.get(code, _IE) for code in _ECOM_HUBS]
        for country in (*hubs, *_COUNTRIES):
            n = 25 if country in hubs else 6
            for cat in rng.choices(online_cats, weights=online_w, k=n):
                self.online.append(make(country, cat, True))
        self.online_weights = [m.popularity for m in self.online]
        self.by_mcc_online: dict[str, list[_Merchant]] = {}
        for m in self.online:
            self.by_mcc_online.setdefault(m.category.mcc, []).append(m)
        self.by_mcc_local: dict[tuple[str, str], list[_Merchant]] = {}
        for code, merchants in self.local.items():
            for m in merchants:
                self.by_mcc_local.setdefault((code, m.category.mcc), []).append(m)
        self.subscription_merchants = [
            _Merchant(f"sub{i:03d}-{mcc}", _COUNTRY["US"], _sub_category(mcc, usd), True, usd, 1.0)
            for i, (mcc, usd) in enumerate(_SUBSCRIPTION_MCCS * 4)
        ]

    def online_merchants(self, mccs: Sequence[str]) -> list[_Merchant]:
        return [m for mcc in mccs for m in self.by_mcc_online.get(mcc, [])]

    def local_merchants(self, country: str, mccs: Sequence[str]) -> list[_Merchant]:
        return [m for mcc in mccs for m in self.by_mcc_local.get((country, mcc), [])]


def _sub_category(mcc: str, usd: float) -> _Category:
    return _Category(mcc, usd, 0.0, True, False, 0.0)


# --- generation -------------------------------------------------------------------------------


def _amount_minor(amount_usd: float, currency: str) -> int:
    major = amount_usd / APPROX_USD_PER_UNIT[currency]
    return max(1, round(major * 10.0 ** minor_unit_exponent(currency)))


def _make_card(index: int, world: _World, rng: random.Random, config: SimulationConfig) -> _Card:
    home = rng.choices(_COUNTRIES, weights=[c.weight for c in _COUNTRIES])[0]
    card_id = f"card-{config.seed}-{index:06d}"
    local = world.local[home.code]
    local_favourites = list(
        {
            m.merchant_id: m for m in rng.choices(local, world.local_weights[home.code], k=14)
        }.values()
    )
    online_favourites = list(
        {m.merchant_id: m for m in rng.choices(world.online, world.online_weights, k=5)}.values()
    )
    n_devices = 1 if rng.random() < 0.7 else 2
    subscriptions = [
        (m, m.typical_usd, rng.randrange(28))
        for m in rng.sample(world.subscription_merchants, rng.choice((0, 0, 1, 1, 2, 3)))
    ]
    card = _Card(
        card_id=card_id,
        home=home,
        rate_per_day=min(max(rng.gammavariate(2.0, 0.6), 0.2), 5.0),
        peak_hour=rng.gauss(14.0, 2.5),
        hour_spread=rng.uniform(2.0, 4.0),
        spend=rng.lognormvariate(0.0, 0.4),
        online_share=rng.betavariate(2.0, 5.0),
        contactless=rng.uniform(0.2, 0.8),
        devices=[f"dev-{card_id}-{k}" for k in range(n_devices)],
        no_device_share=(
            config.fingerprint_blocked_online_share
            if rng.random() < config.fingerprint_blocked_share
            else config.guest_checkout_share
        ),
        vpn=rng.random() < 0.03,
        local_favourites=local_favourites,
        online_favourites=online_favourites,
        subscriptions=subscriptions,
    )
    span_ms = config.n_days * _MS_DAY
    if rng.random() < 0.06:
        card.device_switch_ms = config.start_ms + rng.randrange(span_ms)
    if rng.random() < 0.25:
        others = [c for c in _COUNTRIES if c is not home]
        dest = rng.choices(others, weights=[c.weight + 0.02 for c in others])[0]
        begin = config.start_ms + rng.randrange(span_ms)
        card.trip = (begin, begin + rng.randint(2, 10) * _MS_DAY, dest)
    return card


def _local_time(rng: random.Random, day_start_ms: int, card: _Card, country: _Country) -> int:
    hour = (
        rng.uniform(0, 24) if rng.random() < 0.05 else rng.gauss(card.peak_hour, card.hour_spread)
    )
    local_ms = int((hour % 24.0) * _MS_HOUR)
    return day_start_ms + local_ms - int(country.utc_offset_h * _MS_HOUR)


def _device_at(card: _Card, ts: int, rng: random.Random) -> str:
    if rng.random() < card.no_device_share:
        return ""  # guest checkout, or a browser that blocks fingerprinting
    if card.device_switch_ms is not None and ts >= card.device_switch_ms:
        return f"dev-{card.card_id}-new"
    return rng.choice(card.devices)


def _legit_events(card: _Card, world: _World, rng: random.Random, config: SimulationConfig) -> None:
    flight_ms = 8 * _MS_HOUR
    for day in range(config.n_days):
        day_start = config.start_ms + day * _MS_DAY
        n = _poisson(rng, card.rate_per_day)
        for _ in range(n):
            where = card.home
            abroad = False
            ts = _local_time(rng, day_start, card, where)
            if card.trip is not None and card.trip[0] <= ts < card.trip[1]:
                if ts < card.trip[0] + flight_ms:
                    continue  # on the plane
                where = card.trip[2]
                abroad = True
                ts = _local_time(rng, day_start, card, where)
            if rng.random() < card.online_share:
                merchant = (
                    rng.choice(card.online_favourites)
                    if rng.random() < 0.8
                    else rng.choices(world.online, world.online_weights)[0]
                )
                ip = where.code
                if card.vpn and rng.random() < 0.5:
                    ip = rng.choice(_COUNTRIES).code
                if merchant.category.mcc in _PHONE_ORDER_MCCS and rng.random() < 0.3:
                    event = _Event(ts, card, merchant, 0.0, Channel.MAIL_PHONE_ORDER, "", "")
                else:
                    event = _Event(
                        ts, card, merchant, 0.0, Channel.ECOMMERCE, _device_at(card, ts, rng), ip
                    )
            else:
                if abroad or rng.random() >= 0.8:
                    local = world.local[where.code]
                    merchant = rng.choices(local, world.local_weights[where.code])[0]
                else:
                    merchant = rng.choice(card.local_favourites)
                if merchant.category.mcc == "6011":
                    channel = Channel.ATM
                elif rng.random() < card.contactless:
                    channel = Channel.CONTACTLESS
                else:
                    channel = Channel.CARD_PRESENT
                event = _Event(ts, card, merchant, 0.0, channel, "", "")
            event.amount_usd = merchant.typical_usd * card.spend * rng.lognormvariate(0.0, 0.35)
            card.events.append(event)
    for merchant, usd, day_of_month in card.subscriptions:
        for month_start in range(0, config.n_days, 30):
            day = month_start + day_of_month
            if day < config.n_days:
                ts = config.start_ms + day * _MS_DAY + rng.randrange(2 * _MS_HOUR, 6 * _MS_HOUR)
                card.events.append(_Event(ts, card, merchant, usd, Channel.RECURRING, "", ""))


def _poisson(rng: random.Random, lam: float) -> int:
    threshold = math.exp(-lam)
    k = 0
    p = rng.random()
    while p > threshold:
        k += 1
        p *= rng.random()
    return k


def _typical_usd(card: _Card) -> float:
    amounts = sorted(e.amount_usd for e in card.events if not e.pattern)
    return amounts[len(amounts) // 2] if amounts else 40.0


def _fraud_ip(rng: random.Random, home: _Country) -> str:
    if rng.random() < 0.4:
        return rng.choice(_FRAUD_ONLY_IP)
    return rng.choice([c for c in _COUNTRIES if c is not home]).code


def _fraud_start(rng: random.Random, config: SimulationConfig) -> int:
    return config.start_ms + rng.randrange(_WARMUP_DAYS * _MS_DAY, config.n_days * _MS_DAY)


def _card_testing(card: _Card, world: _World, rng: random.Random, config: SimulationConfig) -> None:
    ts = _fraud_start(rng, config)
    device = "" if rng.random() < 0.3 else f"fraud-dev-{rng.getrandbits(40):010x}"
    ip = _fraud_ip(rng, card.home)
    pattern = FraudPattern.CARD_TESTING.value
    testers = world.online_merchants(_TESTING_MCCS)
    for _ in range(rng.randint(3, 10)):
        ts += rng.randint(5_000, 120_000)
        merchant = rng.choice(testers)
        card.events.append(
            _Event(
                ts, card, merchant, rng.uniform(0.5, 3.0), Channel.ECOMMERCE, device, ip, pattern
            )
        )
    if rng.random() < 0.6:
        goods = world.online_merchants(("5732", "5045"))
        for _ in range(rng.randint(1, 3)):
            ts += rng.randint(2 * _MS_MINUTE, 30 * _MS_MINUTE)
            amount = rng.uniform(150.0, 2000.0)
            card.events.append(
                _Event(ts, card, rng.choice(goods), amount, Channel.ECOMMERCE, device, ip, pattern)
            )


def _account_takeover(
    card: _Card, world: _World, rng: random.Random, config: SimulationConfig
) -> None:
    ts = _fraud_start(rng, config)
    device = f"fraud-dev-{rng.getrandbits(40):010x}"
    ip = _fraud_ip(rng, card.home) if rng.random() < 0.7 else card.home.code
    typical = _typical_usd(card)
    goods = world.online_merchants(("5732", "5045", "4829", "5815"))
    for _ in range(rng.randint(2, 6)):
        ts += rng.randint(5 * _MS_MINUTE, 12 * _MS_HOUR)
        amount = max(80.0, typical * rng.uniform(3.0, 12.0))
        card.events.append(
            _Event(
                ts,
                card,
                rng.choice(goods),
                amount,
                Channel.ECOMMERCE,
                device,
                ip,
                FraudPattern.ACCOUNT_TAKEOVER.value,
            )
        )


def _impossible_travel(
    card: _Card, world: _World, rng: random.Random, config: SimulationConfig
) -> None:
    earliest = config.start_ms + _WARMUP_DAYS * _MS_DAY
    anchors = [
        e
        for e in card.events
        if e.ts >= earliest
        and not e.pattern
        and e.channel in (Channel.CARD_PRESENT, Channel.CONTACTLESS)
        and e.merchant.country is card.home
    ]
    if not anchors:
        return
    ts = rng.choice(anchors).ts
    far = rng.choice([c for c in _COUNTRIES if c.region != card.home.region])
    typical = _typical_usd(card)
    targets = world.local_merchants(far.code, ("5311", "5732", "5944", "6011", "5651"))
    ts += rng.randint(20 * _MS_MINUTE, 4 * _MS_HOUR)
    for _ in range(rng.randint(1, 4)):
        merchant = rng.choice(targets)
        channel = Channel.ATM if merchant.category.mcc == "6011" else Channel.CARD_PRESENT
        amount = typical * rng.uniform(1.5, 6.0)
        card.events.append(
            _Event(
                ts, card, merchant, amount, channel, "", "", FraudPattern.IMPOSSIBLE_TRAVEL.value
            )
        )
        ts += rng.randint(10 * _MS_MINUTE, 90 * _MS_MINUTE)


def _cloned_card_spree(card: _Card, world: _World, rng: random.Random, start_ms: int) -> None:
    favourites = {m.merchant_id for m in card.local_favourites}
    candidates = [
        m
        for m in world.local_merchants(card.home.code, ("5311", "5732", "5944", "6011", "5541"))
        if m.merchant_id not in favourites
    ]
    typical = _typical_usd(card)
    day_start = start_ms - start_ms % _MS_DAY
    for _ in range(rng.randint(1, 5)):
        local_hour = rng.uniform(-2.0, 5.0) % 24.0
        ts = day_start + int((local_hour - card.home.utc_offset_h) * _MS_HOUR) % _MS_DAY
        merchant = rng.choice(candidates)
        if merchant.category.mcc == "6011":
            channel, amount = Channel.ATM, rng.uniform(100.0, 500.0)
        else:
            channel, amount = Channel.CARD_PRESENT, typical * rng.uniform(1.5, 5.0)
        card.events.append(
            _Event(
                ts,
                card,
                merchant,
                amount,
                channel,
                "",
                "",
                FraudPattern.COMPROMISED_MERCHANT.value,
            )
        )
        day_start += rng.choice((0, _MS_DAY, _MS_DAY, 2 * _MS_DAY))


def _compromised_merchants(
    cards: list[_Card], world: _World, rng: random.Random, config: SimulationConfig
) -> None:
    visits: dict[str, list[tuple[int, _Card]]] = {}
    for card in cards:
        for e in card.events:
            if not e.merchant.online and not e.pattern:
                visits.setdefault(e.merchant.merchant_id, []).append((e.ts, card))
    popular = sorted(visits, key=lambda mid: (-len(visits[mid]), mid))[:200]
    n_events = max(1, round(config.compromised_merchants_per_month * config.n_days / 30))
    cloned: set[str] = set()
    for _ in range(n_events):
        merchant_id = rng.choice(popular)
        begin = config.start_ms + rng.randrange(
            (_WARMUP_DAYS - 10) * _MS_DAY, (config.n_days - 5) * _MS_DAY
        )
        end = begin + rng.randint(3, 10) * _MS_DAY
        for ts, card in sorted(visits[merchant_id], key=lambda v: (v[0], v[1].card_id)):
            if (
                begin <= ts < end
                and card.card_id not in cloned
                and rng.random() < config.compromised_clone_probability
            ):
                cloned.add(card.card_id)
                start = ts + rng.randint(2, 20) * _MS_DAY
                if start < config.start_ms + config.n_days * _MS_DAY:
                    _cloned_card_spree(card, world, rng, start)


def _enrolled_device(
    card: _Card, world: _World, rng: random.Random, config: SimulationConfig
) -> None:
    ts = _fraud_start(rng, config)
    device = f"fraud-dev-{rng.getrandbits(40):010x}"
    ip = card.home.code
    pattern = FraudPattern.ENROLLED_DEVICE.value
    typical = _typical_usd(card)
    enrol_at = rng.choice(world.online_merchants(("5815", "5999", "5651")))
    card.events.append(
        _Event(
            ts,
            card,
            enrol_at,
            typical * rng.uniform(0.5, 1.5),
            Channel.ECOMMERCE,
            device,
            ip,
            pattern,
        )
    )
    ts += rng.randint(2 * _MS_DAY, 8 * _MS_DAY)
    goods = world.online_merchants(("5732", "5651", "5311", "5999"))
    for _ in range(rng.randint(2, 5)):
        ts += rng.randint(5 * _MS_MINUTE, 3 * _MS_HOUR)
        amount = typical * rng.uniform(2.0, 5.0)
        card.events.append(
            _Event(ts, card, rng.choice(goods), amount, Channel.ECOMMERCE, device, ip, pattern)
        )


def simulate(config: SimulationConfig | None = None) -> list[LabelledTransaction]:
    """Generate a labelled stream, sorted by time, deterministic for a given ``config``."""
    config = config or SimulationConfig()
    rng = random.Random(config.seed)
    world = _World(rng)
    cards = [_make_card(i, world, rng, config) for i in range(config.n_cards)]
    for card in cards:
        _legit_events(card, world, rng, config)
    for share, inject in (
        (config.card_testing_share, _card_testing),
        (config.account_takeover_share, _account_takeover),
        (config.impossible_travel_share, _impossible_travel),
        (config.enrolled_device_share, _enrolled_device),
    ):
        for card in rng.sample(cards, round(share * len(cards))):
            inject(card, world, rng, config)
    _compromised_merchants(cards, world, rng, config)

    end_ms = config.start_ms + config.n_days * _MS_DAY
    events = [e for card in cards for e in card.events if config.start_ms <= e.ts < end_ms]
    events.sort(key=lambda e: (e.ts, e.card.card_id))
    out = []
    for i, e in enumerate(events):
        currency = e.merchant.country.currency
        tx = Transaction(
            transaction_id=f"tx-{config.seed}-{i:08d}",
            card_id=e.card.card_id,
            merchant_id=e.merchant.merchant_id,
            merchant_category=e.merchant.category.mcc,
            amount_minor=_amount_minor(e.amount_usd, currency),
            currency=currency,
            country=e.merchant.country.code,
            channel=e.channel,
            timestamp_ms=e.ts,
            device_id=e.device,
            ip_country=e.ip_country,
        )
        out.append(LabelledTransaction(tx, bool(e.pattern), e.pattern))
    n_fraud = sum(1 for r in out if r.is_fraud)
    logger.info(
        "simulated %d transactions on %d cards over %d days, %d fraud (%.3f%%)",
        len(out),
        config.n_cards,
        config.n_days,
        n_fraud,
        100.0 * n_fraud / max(len(out), 1),
    )
    return out


# --- stream I/O -------------------------------------------------------------------------------


def _to_json(record: LabelledTransaction) -> str:
    tx = record.tx
    return json.dumps(
        {
            "transaction_id": tx.transaction_id,
            "card_id": tx.card_id,
            "merchant_id": tx.merchant_id,
            "merchant_category": tx.merchant_category,
            "amount_minor": tx.amount_minor,
            "currency": tx.currency,
            "country": tx.country,
            "channel": tx.channel.name,
            "timestamp_ms": tx.timestamp_ms,
            "device_id": tx.device_id,
            "ip_country": tx.ip_country,
            "is_fraud": record.is_fraud,
            "pattern": record.pattern,
        },
        separators=(",", ":"),
    )


def write_stream(path: Path, records: Iterable[LabelledTransaction]) -> int:
    """Write ``records`` as gzip JSON lines (deterministic bytes); returns how many were written."""
    count = 0
    with (
        path.open("wb") as raw,
        gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz,
    ):
        for record in records:
            gz.write(_to_json(record).encode())
            gz.write(b"\n")
            count += 1
    return count


def read_stream(path: Path) -> Iterator[LabelledTransaction]:
    """Read a stream written by :func:`write_stream`; ``ValueError`` names the bad line."""
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line_no, line in enumerate(lines, start=1):
            try:
                doc = json.loads(line)
                tx = Transaction(
                    transaction_id=str(doc["transaction_id"]),
                    card_id=str(doc["card_id"]),
                    merchant_id=str(doc["merchant_id"]),
                    merchant_category=str(doc["merchant_category"]),
                    amount_minor=int(doc["amount_minor"]),
                    currency=str(doc["currency"]),
                    country=str(doc["country"]),
                    channel=Channel[doc["channel"]],
                    timestamp_ms=int(doc["timestamp_ms"]),
                    device_id=str(doc.get("device_id", "")),
                    ip_country=str(doc.get("ip_country", "")),
                )
                yield LabelledTransaction(tx, bool(doc["is_fraud"]), str(doc.get("pattern", "")))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{line_no}: bad stream record: {exc!r}") from exc
