"""Replaying transactions: wire form, the endless time-shifted stream, repeats in a plan."""

from __future__ import annotations

import numpy as np
import pytest

from cascade.v1 import scoring_pb2
from cascade.wire import to_wire
from loadtests.replay import ReplayStream, load_transactions, plan_requests
from orchestrator.validation import validate_transaction
from tests.conftest import BASE_TS_MS, make_transaction


def _base(n: int) -> list:  # type: ignore[type-arg]
    return [
        make_transaction(
            transaction_id=f"tx-{i:04d}", card_id=f"card-{i % 3}", timestamp_ms=BASE_TS_MS + i
        )
        for i in range(n)
    ]


def test_stream_replays_in_time_order_with_a_nonce() -> None:
    stream = ReplayStream(list(reversed(_base(3))), nonce="ab12")
    first = [stream.next() for _ in range(3)]
    assert [t.transaction_id for t in first] == ["tx-0000.ab12", "tx-0001.ab12", "tx-0002.ab12"]
    assert [t.timestamp_ms for t in first] == [BASE_TS_MS, BASE_TS_MS + 1, BASE_TS_MS + 2]


def test_stream_wraps_later_in_time_with_new_ids() -> None:
    stream = ReplayStream(_base(2), nonce="n")
    seen = [stream.next() for _ in range(5)]
    ids = [t.transaction_id for t in seen]
    assert len(set(ids)) == 5
    stamps = [t.timestamp_ms for t in seen]
    assert stamps == sorted(stamps)  # histories keep growing chronologically
    assert seen[2].timestamp_ms - seen[0].timestamp_ms == 1 + 86_400_000
    assert stream.position == (2, 1)


def test_stream_needs_transactions() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ReplayStream([], nonce="x")


def _ids(payloads: tuple[bytes, ...]) -> list[str]:
    return [scoring_pb2.ScoreRequest.FromString(p).transaction.transaction_id for p in payloads]


def test_plan_without_repeats_sends_each_transaction_once_in_order() -> None:
    offsets = np.arange(50) / 100.0
    (plan,) = plan_requests([offsets], ReplayStream(_base(100), nonce="n"), repeat_share=0.0)
    ids = _ids(plan.payloads)
    assert ids == [f"tx-{i:04d}.n" for i in range(50)]
    assert plan.repeats == 0 and plan.offsets_s == tuple(offsets)


def test_repeats_have_the_configured_share_and_are_old_enough() -> None:
    offsets = np.arange(5000) / 1000.0  # 5 s at 1000/s
    (plan,) = plan_requests(
        [offsets], ReplayStream(_base(10_000), nonce="n"), repeat_share=0.3, repeat_min_age_s=0.1
    )
    ids = _ids(plan.payloads)
    first_seen: dict[str, float] = {}
    repeats = 0
    for tx_id, offset in zip(ids, plan.offsets_s, strict=True):
        if tx_id in first_seen:
            repeats += 1
            assert offset - first_seen[tx_id] >= 0.1 - 1e-9
        else:
            first_seen[tx_id] = offset
    assert repeats == plan.repeats
    # Nothing is old enough during the first 0.1 s, so the share is a little under 30%.
    assert repeats / len(ids) == pytest.approx(0.3 * 0.98, abs=0.03)


def test_plans_over_parts_draw_fresh_transactions_in_global_time_order() -> None:
    parts = [np.array([0.0, 0.2, 0.4]), np.array([0.1, 0.3])]
    plans = plan_requests(parts, ReplayStream(_base(10), nonce="n"), repeat_share=0.0)
    assert _ids(plans[0].payloads) == ["tx-0000.n", "tx-0002.n", "tx-0004.n"]
    assert _ids(plans[1].payloads) == ["tx-0001.n", "tx-0003.n"]


def test_plans_are_deterministic_per_seed() -> None:
    offsets = [np.arange(300) / 100.0]
    a = plan_requests(offsets, ReplayStream(_base(500), nonce="n"), repeat_share=0.5, seed=4)
    b = plan_requests(offsets, ReplayStream(_base(500), nonce="n"), repeat_share=0.5, seed=4)
    assert a == b


def test_repeat_share_is_checked() -> None:
    with pytest.raises(ValueError, match="repeat_share"):
        plan_requests([np.zeros(1)], ReplayStream(_base(1), nonce="n"), repeat_share=1.5)


def test_samples_source_gives_valid_transactions() -> None:
    txs = load_transactions("samples", count=30, seed=7)
    assert len(txs) == 30
    assert all(validate_transaction(to_wire(t)) == t for t in txs)


def test_unknown_source_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown transaction source"):
        load_transactions("nope", count=1, seed=1)
