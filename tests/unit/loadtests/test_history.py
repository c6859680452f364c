"""Mature card histories: which cards and transactions, the backfill batches, what the load saw."""

from __future__ import annotations

import pytest

from cascade.features import HISTORY_LEN
from cascade.transaction import Transaction
from loadtests.history import backfill_batches, history_summary, split_mature
from loadtests.replay import ReplayStream
from tests.conftest import BASE_TS_MS, make_transaction


def _card(card: str, n: int, *, start: int = 0, step: int = 3) -> list[Transaction]:
    return [
        make_transaction(
            transaction_id=f"{card}-{i:03d}",
            card_id=card,
            timestamp_ms=BASE_TS_MS + start + i * step,
        )
        for i in range(n)
    ]


def test_only_cards_with_more_than_a_full_history_are_kept() -> None:
    txs = _card("a", HISTORY_LEN + 3, start=1) + _card("b", HISTORY_LEN) + _card("c", 10)
    split = split_mature(list(reversed(txs)))
    assert split.prior_counts == {"a": HISTORY_LEN}
    assert [t.transaction_id for t in split.load] == ["a-064", "a-065", "a-066"]
    # The history is each card's earliest transactions, all before its first load transaction.
    assert max(t.timestamp_ms for t in split.history) < min(t.timestamp_ms for t in split.load)


def test_split_keeps_each_card_in_time_order_and_the_load_globally_ordered() -> None:
    txs = _card("a", 70, start=0, step=2) + _card("b", 70, start=1, step=2)
    split = split_mature(txs, history_len=64)
    assert split.prior_counts == {"a": 64, "b": 64}
    stamps = [t.timestamp_ms for t in split.load]
    assert stamps == sorted(stamps) and len(stamps) == 12


def test_backfill_batches_hold_whole_cards_in_time_order() -> None:
    history = []
    for k in range(9):  # 9 cards x 64 = 576 transactions: more than one batch of 500
        history += _card(f"c{k}", 64, start=k)
    batches = backfill_batches(sorted(history, key=lambda t: t.timestamp_ms), max_batch=500)
    assert [len(b) for b in batches] == [448, 128]  # 7 whole cards, then 2
    assert sum(len(b) for b in batches) == len(history)
    for batch in batches:
        per_card: dict[str, list[int]] = {}
        for tx in batch:
            per_card.setdefault(tx.card_id, []).append(tx.timestamp_ms)
        assert all(len(s) == 64 and s == sorted(s) for s in per_card.values())
    cards = [{t.card_id for t in b} for b in batches]
    assert not cards[0] & cards[1]  # no card split over two batches


def test_a_card_longer_than_a_batch_gets_batches_of_its_own_in_order() -> None:
    batches = backfill_batches(_card("x", 7) + _card("y", 2), max_batch=3)
    assert [[t.transaction_id for t in b] for b in batches] == [
        ["x-000", "x-001", "x-002"],
        ["x-003", "x-004", "x-005"],
        ["x-006", "y-000", "y-001"],
    ]
    with pytest.raises(ValueError, match="max_batch"):
        backfill_batches([], max_batch=0)


def test_history_summary() -> None:
    assert history_summary({}) == {
        "count": 0,
        "min": None,
        "p50": None,
        "max": None,
        "full_share": None,
    }
    summary = history_summary({0: 1, 3: 2, HISTORY_LEN: 5})
    assert summary == {
        "count": 8,
        "min": 0,
        "p50": HISTORY_LEN,
        "max": HISTORY_LEN,
        "full_share": 0.625,
    }


def test_stream_counts_the_history_each_card_had_when_sent() -> None:
    base = _card("a", 3) + _card("b", 2, start=1)
    cold = ReplayStream(base, nonce="n")
    for _ in range(5):
        cold.next()
    assert cold.history_lengths == {0: 2, 1: 2, 2: 1}
    warm = ReplayStream(base, nonce="n", prior_history={"a": HISTORY_LEN, "b": 63})
    for _ in range(10):  # two passes: the counts go on growing, capped at HISTORY_LEN
        warm.next()
    assert warm.history_lengths == {63: 1, HISTORY_LEN: 9}
