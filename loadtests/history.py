"""Mature card histories: which simulated transactions are backfilled and which are load (pure).

A running deployment scores mostly cards it has seen many times, so their Redis history is full
(:data:`~cascade.features.HISTORY_LEN` entries) and the stage-2 sequence model reads a whole
sequence. A freshly started stack replaying a short simulated stream sees the opposite: cards
with a few days of history. :func:`split_mature` keeps only cards with more than ``history_len``
transactions in the simulated stream, takes each one's first ``history_len`` as history (sent to
the target with ``ScoreBatch`` before warm-up, see :mod:`loadtests.backfill`) and the rest as the
load, so every transaction the load sends has a card with a full history behind it.

:func:`backfill_batches` packs the history into ``ScoreBatch`` requests of at most ``max_batch``
transactions, whole cards per batch and each card in timestamp order, so a card's history is never
split over two batches whose post-answer writes could land out of order.
:func:`history_summary` describes the history lengths the load's transactions met.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from cascade.features import HISTORY_LEN
from cascade.transaction import Transaction

__all__ = [
    "MAX_BACKFILL_BATCH",
    "HistoryMode",
    "MatureSplit",
    "backfill_batches",
    "history_summary",
    "split_mature",
]

MAX_BACKFILL_BATCH: Final = 500


class HistoryMode(StrEnum):
    """What card history the target holds when the load starts."""

    MATURE = "mature"  # every card backfilled with HISTORY_LEN earlier transactions
    AS_SIMULATED = "as-simulated"  # nothing backfilled: histories grow as the stream replays


@dataclass(frozen=True, slots=True)
class MatureSplit:
    """History to backfill (whole cards, time order) and load transactions (time order)."""

    history: tuple[Transaction, ...]
    load: tuple[Transaction, ...]

    @property
    def prior_counts(self) -> dict[str, int]:
        """Card id -> how many of its transactions the backfill puts in front of the load."""
        return dict(Counter(tx.card_id for tx in self.history))


def split_mature(
    transactions: Sequence[Transaction], history_len: int = HISTORY_LEN
) -> MatureSplit:
    """Cards with more than ``history_len`` transactions: their first ``history_len`` (by
    timestamp) are history, the rest load. Other cards are dropped."""
    if history_len < 1:
        raise ValueError(f"history_len must be >= 1, got {history_len}")
    ordered = sorted(transactions, key=lambda t: (t.timestamp_ms, t.transaction_id))
    total = Counter(tx.card_id for tx in ordered)
    seen: Counter[str] = Counter()
    history: list[Transaction] = []
    load: list[Transaction] = []
    for tx in ordered:
        if total[tx.card_id] <= history_len:
            continue
        seen[tx.card_id] += 1
        (history if seen[tx.card_id] <= history_len else load).append(tx)
    return MatureSplit(tuple(history), tuple(load))


def backfill_batches(
    history: Sequence[Transaction], max_batch: int = MAX_BACKFILL_BATCH
) -> list[list[Transaction]]:
    """``history`` as ``ScoreBatch``-sized lists: whole cards, each card in timestamp order.

    A card with more than ``max_batch`` transactions gets batches of its own, in order.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    by_card: dict[str, list[Transaction]] = {}
    for tx in history:
        by_card.setdefault(tx.card_id, []).append(tx)
    batches: list[list[Transaction]] = []
    current: list[Transaction] = []
    for card_txs in by_card.values():
        card_txs.sort(key=lambda t: (t.timestamp_ms, t.transaction_id))
        if len(current) + len(card_txs) > max_batch and current:
            batches.append(current)
            current = []
        while len(card_txs) > max_batch:
            batches.append(card_txs[:max_batch])
            card_txs = card_txs[max_batch:]
        current.extend(card_txs)
    if current:
        batches.append(current)
    return batches


def history_summary(lengths: Mapping[int, int], history_len: int = HISTORY_LEN) -> dict[str, Any]:
    """Count, min, p50, max and the share at ``history_len`` of a length -> count histogram."""
    count = sum(lengths.values())
    if not count:
        return {"count": 0, "min": None, "p50": None, "max": None, "full_share": None}
    ordered = sorted(lengths.items())
    half, running, p50 = (count + 1) // 2, 0, ordered[-1][0]
    for length, n in ordered:
        running += n
        if running >= half:
            p50 = length
            break
    full = sum(n for length, n in ordered if length >= history_len)
    return {
        "count": count,
        "min": ordered[0][0],
        "p50": p50,
        "max": ordered[-1][0],
        "full_share": round(full / count, 6),
    }
