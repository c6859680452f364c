"""Sample traffic for ``cascade score`` and ``cascade up --sample``: simulator transactions.

A small seeded world (``training.simulator``) gives a month of a few hundred cards' activity with
labelled fraud. The sample keeps the stream's time order and mixes in its fraud so the table has
something to catch; each transaction comes with its ground truth (the fraud pattern, or "").
:attr:`Sample.history` holds the sampled cards' earlier transactions: sent first (``ScoreBatch``),
they give the online features the card history a real deployment would have.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

from cascade.v1 import scoring_pb2
from cascade.wire import to_wire
from training.simulator import SimulationConfig, simulate

_FRAUD_SHARE: Final = 0.3
_WORLD: Final = SimulationConfig(n_cards=300, n_days=30)


@dataclass(frozen=True, slots=True)
class Sample:
    """Transactions to show (with ground truth) and the history that precedes them."""

    labelled: list[tuple[scoring_pb2.Transaction, str]]
    history: list[scoring_pb2.Transaction]


def sample_transactions(count: int, *, seed: int = 7) -> list[scoring_pb2.Transaction]:
    """``count`` transactions in time order, about 30% of them fraud."""
    return [tx for tx, _ in labelled_sample(count, seed=seed).labelled]


def labelled_sample(count: int, *, seed: int = 7) -> Sample:
    """``count`` transactions in time order, about 30% of them fraud, with their patterns, and
    every earlier transaction of their cards (before each card's first sampled one), in order."""
    stream = simulate(SimulationConfig(seed=seed, n_cards=_WORLD.n_cards, n_days=_WORLD.n_days))
    rng = random.Random(seed)
    frauds = [i for i, r in enumerate(stream) if r.is_fraud]
    genuine = [i for i, r in enumerate(stream) if not r.is_fraud]
    n_fraud = min(len(frauds), round(count * _FRAUD_SHARE))
    picked = sorted(rng.sample(frauds, n_fraud) + rng.sample(genuine, count - n_fraud))
    first_pick: dict[str, int] = {}
    for i in picked:
        first_pick.setdefault(stream[i].tx.card_id, i)
    history = [to_wire(r.tx) for i, r in enumerate(stream) if i < first_pick.get(r.tx.card_id, -1)]
    return Sample(
        labelled=[(to_wire(stream[i].tx), stream[i].pattern) for i in picked], history=history
    )
