"""Sample traffic for ``cascade score`` and ``cascade up --sample``: simulator transactions.

A small seeded world (``training.simulator``) gives a month of a few hundred cards' activity with
labelled fraud. The sample keeps the stream's time order and mixes in its fraud so the table has
something to catch; each transaction comes with its ground truth (the fraud pattern, or "").
"""

from __future__ import annotations

import random
from typing import Final

from cascade.v1 import scoring_pb2
from cascade.wire import to_wire
from training.simulator import SimulationConfig, simulate

_FRAUD_SHARE: Final = 0.3
_WORLD: Final = SimulationConfig(n_cards=300, n_days=30)


def sample_transactions(count: int, *, seed: int = 7) -> list[scoring_pb2.Transaction]:
    """``count`` transactions in time order, about 30% of them fraud."""
    return [tx for tx, _ in labelled_sample(count, seed=seed)]


def labelled_sample(count: int, *, seed: int = 7) -> list[tuple[scoring_pb2.Transaction, str]]:
    """``count`` transactions in time order, about 30% of them fraud, with their patterns."""
    stream = simulate(_world(seed))
    rng = random.Random(seed)
    frauds = [i for i, r in enumerate(stream) if r.is_fraud]
    genuine = [i for i, r in enumerate(stream) if not r.is_fraud]
    n_fraud = min(len(frauds), round(count * _FRAUD_SHARE))
    picked = sorted(rng.sample(frauds, n_fraud) + rng.sample(genuine, count - n_fraud))
    return [(to_wire(stream[i].tx), stream[i].pattern) for i in picked]


def _world(seed: int) -> SimulationConfig:
    return SimulationConfig(seed=seed, n_cards=_WORLD.n_cards, n_days=_WORLD.n_days)
