"""Label delays for a simulated stream: which transactions get an outcome, which one, and when.

The model (per transaction, independent of how the cascade decided, so quality can be measured
on every decision; in production a declined fraud never becomes a chargeback, see
``docs/quality.md``):

* **Fraud** is never labelled with probability :data:`FRAUD_NEVER_LABELLED` (10%; 50% for card
  testing, whose tiny probing amounts cardholders seldom dispute). Of the rest,
  :data:`CONFIRMED_SHARE` (30%) is confirmed by the fraud team or the cardholder soon after
  (an alert, a call): log-normal delay, median 2 days, sigma 0.8, 1 hour .. 30 days; the others
  arrive as **chargebacks**: the cardholder notices on the statement, disputes, and the issuer's
  chargeback reaches the acquirer: log-normal, median 21 days, sigma 0.5, 3 .. 120 days (the
  card schemes' usual 120-day dispute limit).
* **Genuine** transactions are labelled with probability :data:`GENUINE_LABELLED` (2%: reviewed
  and cleared cases, cardholder confirmations), log-normal median 1 day, sigma 0.8, 10 minutes ..
  14 days; the rest never are (a genuine payment is confirmed by silence).

Deterministic for a given seed.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from training.simulator import FraudPattern, LabelledTransaction

__all__ = [
    "CONFIRMED_SHARE",
    "FRAUD_NEVER_LABELLED",
    "GENUINE_LABELLED",
    "SimulatedOutcome",
    "simulate_outcomes",
    "write_outcome_csv",
]

FRAUD_NEVER_LABELLED: Final = 0.10
CARD_TESTING_NEVER_LABELLED: Final = 0.50
CONFIRMED_SHARE: Final = 0.30
GENUINE_LABELLED: Final = 0.02

_MS_HOUR: Final = 3_600_000
_MS_DAY: Final = 86_400_000


@dataclass(frozen=True, slots=True)
class SimulatedOutcome:
    """One outcome row: the label kind (``confirmed_fraud``, ``chargeback``, ``genuine``)."""

    transaction_id: str
    label: str
    reported_at_ms: int


def _lognormal_ms(rng: random.Random, median_ms: float, sigma: float, lo: float, hi: float) -> int:
    return int(min(max(median_ms * math.exp(rng.gauss(0.0, sigma)), lo), hi))


def simulate_outcomes(
    records: Iterable[LabelledTransaction], *, seed: int = 0
) -> Iterator[SimulatedOutcome]:
    """The outcomes the model above gives ``records`` (those left unlabelled yield nothing)."""
    rng = random.Random(seed)
    for record in records:
        tx = record.tx
        if record.is_fraud:
            never = (
                CARD_TESTING_NEVER_LABELLED
                if record.pattern == FraudPattern.CARD_TESTING
                else FRAUD_NEVER_LABELLED
            )
            if rng.random() < never:
                continue
            if rng.random() < CONFIRMED_SHARE:
                label = "confirmed_fraud"
                delay = _lognormal_ms(rng, 2 * _MS_DAY, 0.8, _MS_HOUR, 30 * _MS_DAY)
            else:
                label = "chargeback"
                delay = _lognormal_ms(rng, 21 * _MS_DAY, 0.5, 3 * _MS_DAY, 120 * _MS_DAY)
        else:
            if rng.random() >= GENUINE_LABELLED:
                continue
            label = "genuine"
            delay = _lognormal_ms(rng, _MS_DAY, 0.8, 10 * 60_000, 14 * _MS_DAY)
        yield SimulatedOutcome(tx.transaction_id, label, tx.timestamp_ms + delay)


def write_outcome_csv(path: Path, outcomes: Iterable[SimulatedOutcome]) -> int:
    """Write the ``cascade outcomes import`` CSV (sorted by reported time, as a feed would
    deliver them); returns how many rows."""
    rows = sorted(outcomes, key=lambda o: (o.reported_at_ms, o.transaction_id))
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["transaction_id", "label", "reported_at", "source"])
        for o in rows:
            writer.writerow([o.transaction_id, o.label, o.reported_at_ms, "simulator"])
    return len(rows)
