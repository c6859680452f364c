"""What the generator sends: simulator transactions, replayed in time order, with repeats.

Pure: no I/O and no clocks. :class:`ReplayStream` hands out the simulated stream in order and,
once it runs out, starts it again shifted forward in time (so card histories in Redis keep growing
chronologically) with a pass suffix on the ids. :func:`plan_requests` turns a step's arrival
offsets (one array per generator process) into serialised ``ScoreRequest`` bytes: each arrival is
either the stream's next transaction or, with probability ``repeat_share``, an exact repeat of one
sent at least ``repeat_min_age_s`` earlier (same id and fields, so the output cache can answer it).
:func:`load_mature` gives the base for mature card histories (:mod:`loadtests.history`): a longer
simulation, split into each kept card's backfilled history and the load.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from cascade.features import HISTORY_LEN
from cascade.transaction import Transaction
from cascade.v1 import scoring_pb2
from cascade.wire import to_wire
from loadtests.history import MatureSplit, split_mature

__all__ = [
    "ReplayStream",
    "RequestPlan",
    "load_mature",
    "load_transactions",
    "plan_requests",
    "tagged",
]

_DAY_MS: Final = 86_400_000
_MATURE_DAYS: Final = 90
_MATURE_LOAD_PER_CARD: Final = 50  # load transactions a simulated card gives, on average
_MATURE_MAX_COUNT: Final = 50_000  # bounds the backfill (about 1.3x this many transactions)


def tagged(tx: Transaction, nonce: str, pass_index: int = 0) -> Transaction:
    """``tx`` with the run's nonce (and, from the second pass on, the pass) in its id; nothing
    else changes (shifting the time of a later pass is the stream's job)."""
    suffix = f".{nonce}" if pass_index == 0 else f".{nonce}p{pass_index}"
    return dataclasses.replace(tx, transaction_id=tx.transaction_id + suffix)


class ReplayStream:
    """The base transactions in order, forever: pass ``k`` is shifted ``k`` spans later in time.

    Every id gets ``.{nonce}`` (and ``p{k}`` from the second pass on), so two load runs, or two
    passes of one run, never reuse an id unless they mean to.

    ``prior_history`` (card id -> transactions already in the target, e.g. backfilled) starts each
    card's count; :attr:`history_lengths` counts, per handed-out transaction, how long its card's
    history was at that point (capped at ``HISTORY_LEN``), as planned: what the target really
    stored also depends on which answers it wrote back.
    """

    def __init__(
        self,
        base: Sequence[Transaction],
        *,
        nonce: str,
        prior_history: Mapping[str, int] | None = None,
    ) -> None:
        if not base:
            raise ValueError("the replay stream needs at least one transaction")
        self._base = tuple(sorted(base, key=lambda t: t.timestamp_ms))
        self._nonce = nonce
        self._span_ms = self._base[-1].timestamp_ms - self._base[0].timestamp_ms + _DAY_MS
        self._position = 0
        self._pass = 0
        self._per_card: Counter[str] = Counter(prior_history or {})
        self.history_lengths: Counter[int] = Counter()

    @property
    def position(self) -> tuple[int, int]:
        """``(pass, index)`` of the next transaction."""
        return self._pass, self._position

    def next(self) -> Transaction:
        """The next transaction of the endless, time-ordered stream."""
        tx = self._base[self._position]
        out = dataclasses.replace(
            tagged(tx, self._nonce, self._pass),
            timestamp_ms=tx.timestamp_ms + self._pass * self._span_ms,
        )
        self.history_lengths[min(self._per_card[tx.card_id], HISTORY_LEN)] += 1
        self._per_card[tx.card_id] += 1
        self._position += 1
        if self._position == len(self._base):
            self._position = 0
            self._pass += 1
        return out


@dataclass(frozen=True, slots=True)
class RequestPlan:
    """One generator process's part of a step: intended offsets and the payload for each."""

    offsets_s: tuple[float, ...]
    payloads: tuple[bytes, ...]
    repeats: int

    def __post_init__(self) -> None:
        if len(self.offsets_s) != len(self.payloads):
            raise ValueError("one payload per offset")


def plan_requests(
    parts: Sequence[npt.NDArray[np.float64]],
    stream: ReplayStream,
    *,
    repeat_share: float,
    repeat_min_age_s: float = 0.1,
    seed: int = 1,
) -> list[RequestPlan]:
    """Give every arrival of every part a request, walking all arrivals in global time order.

    Fresh transactions come from ``stream`` in order, so concurrent processes still send each
    card's transactions roughly in time order. A repeat copies a transaction (from any part) whose
    intended send time is at least ``repeat_min_age_s`` earlier, so its answer is usually cached.
    """
    if not 0.0 <= repeat_share <= 1.0:
        raise ValueError(f"repeat_share must be within 0..1, got {repeat_share}")
    rng = random.Random(seed)
    labelled = sorted(
        (float(offset), part, i) for part, offs in enumerate(parts) for i, offset in enumerate(offs)
    )
    payloads: list[list[bytes]] = [[b""] * len(offs) for offs in parts]
    repeats = [0] * len(parts)
    sent_offsets: list[float] = []
    sent_payloads: list[bytes] = []
    eligible = 0  # sent_*[:eligible] are old enough to be repeated
    for offset, part, i in labelled:
        while eligible < len(sent_offsets) and sent_offsets[eligible] <= offset - repeat_min_age_s:
            eligible += 1
        if eligible and rng.random() < repeat_share:
            payload = sent_payloads[rng.randrange(eligible)]
            repeats[part] += 1
        else:
            tx = stream.next()
            payload = scoring_pb2.ScoreRequest(transaction=to_wire(tx)).SerializeToString()
        payloads[part][i] = payload
        sent_offsets.append(offset)
        sent_payloads.append(payload)
    return [
        RequestPlan(tuple(float(o) for o in offs), tuple(payloads[p]), repeats[p])
        for p, offs in enumerate(parts)
    ]


def load_transactions(source: str, *, count: int, seed: int) -> list[Transaction]:
    """Base transactions from ``"simulator"`` (:mod:`training.simulator`) or ``"samples"``.

    The simulator is sized to give at least ``count`` transactions (about 1.2 per card per day);
    ``samples`` is :mod:`devstack.samples`' small hand-written traffic, for when the simulator is not
    installed.
    """
    if source == "simulator":
        from training.simulator import SimulationConfig, simulate

        n_days = 20
        n_cards = max(50, int(count / (1.1 * n_days)) + 1)
        records = simulate(SimulationConfig(seed=seed, n_cards=n_cards, n_days=n_days))
        return [record.tx for record in records]
    if source == "samples":
        from devstack.samples import sample_transactions
        from orchestrator.validation import validate_transaction

        return [validate_transaction(tx) for tx in sample_transactions(count, seed=seed)]
    raise ValueError(f"unknown transaction source {source!r} (simulator or samples)")


def load_mature(count: int, *, seed: int) -> MatureSplit:
    """About ``count`` load transactions (at most 50,000: the stream repeats beyond) of simulated
    cards with a full history, and that history (``HISTORY_LEN`` per card) to backfill first.

    Cards are simulated for 90 days so that most pass ``HISTORY_LEN`` transactions; the ones that
    do not are left out (:func:`~loadtests.history.split_mature`).
    """
    from training.simulator import SimulationConfig, simulate

    wanted = min(count, _MATURE_MAX_COUNT)
    n_cards = max(20, math.ceil(wanted / _MATURE_LOAD_PER_CARD))
    records = simulate(SimulationConfig(seed=seed, n_cards=n_cards, n_days=_MATURE_DAYS))
    split = split_mature([record.tx for record in records])
    if not split.load:
        raise ValueError("no simulated card has more than HISTORY_LEN transactions")
    return split
