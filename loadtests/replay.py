"""What the generator sends: simulator transactions, replayed in time order, with repeats.

Pure: no I/O and no clocks. :class:`ReplayStream` hands out the simulated stream in order and,
once it runs out, starts it again shifted forward in time (so card histories in Redis keep growing
chronologically) with a pass suffix on the ids. :func:`plan_requests` turns a step's arrival
offsets (one array per generator process) into serialised ``ScoreRequest`` bytes: each arrival is
either the stream's next transaction or, with probability ``repeat_share``, an exact repeat of one
sent at least ``repeat_min_age_s`` earlier (same id and fields, so the output cache can answer it).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from cascade.transaction import Transaction
from cascade.v1 import scoring_pb2
from cascade.wire import to_wire

__all__ = [
    "ReplayStream",
    "RequestPlan",
    "load_transactions",
    "plan_requests",
]

_DAY_MS: Final = 86_400_000


class ReplayStream:
    """The base transactions in order, forever: pass ``k`` is shifted ``k`` spans later in time.

    Every id gets ``.{nonce}`` (and ``p{k}`` from the second pass on), so two load runs, or two
    passes of one run, never reuse an id unless they mean to.
    """

    def __init__(self, base: Sequence[Transaction], *, nonce: str) -> None:
        if not base:
            raise ValueError("the replay stream needs at least one transaction")
        self._base = tuple(sorted(base, key=lambda t: t.timestamp_ms))
        self._nonce = nonce
        self._span_ms = self._base[-1].timestamp_ms - self._base[0].timestamp_ms + _DAY_MS
        self._position = 0
        self._pass = 0

    @property
    def position(self) -> tuple[int, int]:
        """``(pass, index)`` of the next transaction."""
        return self._pass, self._position

    def next(self) -> Transaction:
        """The next transaction of the endless, time-ordered stream."""
        tx = self._base[self._position]
        suffix = f".{self._nonce}" if self._pass == 0 else f".{self._nonce}p{self._pass}"
        out = dataclasses.replace(
            tx,
            transaction_id=tx.transaction_id + suffix,
            timestamp_ms=tx.timestamp_ms + self._pass * self._span_ms,
        )
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
    ``samples`` is :mod:`cascade.samples`' small hand-written traffic, for when the simulator is not
    installed.
    """
    if source == "simulator":
        from training.simulator import SimulationConfig, simulate

        n_days = 20
        n_cards = max(50, int(count / (1.1 * n_days)) + 1)
        records = simulate(SimulationConfig(seed=seed, n_cards=n_cards, n_days=n_days))
        return [record.tx for record in records]
    if source == "samples":
        from cascade.samples import sample_transactions
        from orchestrator.validation import validate_transaction

        return [validate_transaction(tx) for tx in sample_transactions(count, seed=seed)]
    raise ValueError(f"unknown transaction source {source!r} (simulator or samples)")
