"""Unit tests for cascade.features: encoding, values, tensor layout, online/offline parity."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from cascade.features import (
    HISTORY_LEN,
    N_SCREENING_FEATURES,
    SCREENING_FEATURE_NAMES,
    SEQUENCE_LEN,
    TOKEN_DIM,
    TOKEN_FEATURE_NAMES,
    CardHistories,
    HistoryEntry,
    decode_history_entries,
    decode_history_entry,
    encode_history_entry,
    history_entry,
    insert_entry,
    screening_features,
    sequence_tensor,
    visible_history,
)
from cascade.transaction import Channel, Transaction

T0 = 1_750_000_000_000  # ms
MINUTE = 60_000
HOUR = 60 * MINUTE
DAY = 24 * HOUR
S = {name: i for i, name in enumerate(SCREENING_FEATURE_NAMES)}
K = {name: i for i, name in enumerate(TOKEN_FEATURE_NAMES)}


def tx(
    ts: int,
    amount_minor: int = 2500,
    *,
    card: str = "card-1",
    currency: str = "USD",
    country: str = "US",
    merchant: str = "m-1",
    mcc: str = "5411",
    channel: Channel = Channel.CARD_PRESENT,
    device: str = "dev-1",
    ip_country: str = "",
    tx_id: str = "",
) -> Transaction:
    return Transaction(
        transaction_id=tx_id or f"tx-{ts}",
        card_id=card,
        merchant_id=merchant,
        merchant_category=mcc,
        amount_minor=amount_minor,
        currency=currency,
        country=country,
        channel=channel,
        timestamp_ms=ts,
        device_id=device,
        ip_country=ip_country,
    )


def newest_first(*txs: Transaction) -> list[HistoryEntry]:
    return [history_entry(t) for t in sorted(txs, key=lambda t: -t.timestamp_ms)]


def test_contract_constants() -> None:
    assert HISTORY_LEN == 64
    assert SEQUENCE_LEN == 65
    assert len(SCREENING_FEATURE_NAMES) == N_SCREENING_FEATURES == len(set(SCREENING_FEATURE_NAMES))
    assert len(TOKEN_FEATURE_NAMES) == TOKEN_DIM == len(set(TOKEN_FEATURE_NAMES))
    assert TOKEN_FEATURE_NAMES[0] == "real"


def test_history_entry_round_trips_through_bytes() -> None:
    entry = history_entry(
        tx(T0, 123_456, currency="JPY", country="JP", merchant="店-7", device="", ip_country="US")
    )
    data = encode_history_entry(entry)
    assert isinstance(data, bytes)
    assert encode_history_entry(entry) == data  # deterministic
    assert len(data) < 64
    assert decode_history_entry(data) == entry


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\x01\x02",
        b"\x02" + bytes(17) + b"USD\x1fm\x1f5411\x1fUS\x1f\x1f",  # unknown version
        b"\x01" + bytes(16) + b"\x09" + b"USD\x1fm\x1f5411\x1fUS\x1f\x1f",  # bad channel
        b"\x01" + bytes(16) + b"\x01" + b"USD\x1fm\x1f5411",  # too few fields
        b"\x01" + bytes(16) + b"\x01" + b"USD\x1f\xff\xfe\x1f5411\x1fUS\x1f\x1f",  # not UTF-8
    ],
)
def test_decode_rejects_garbage(garbage: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - several distinct messages
        decode_history_entry(garbage)


def test_decode_many_keeps_the_readable_entries_in_order_and_counts_the_rest() -> None:
    good = [encode_history_entry(history_entry(tx(T0 + i * MINUTE, 100 + i))) for i in range(3)]
    entry = good[0]
    bad = {  # each one a way an entry can be unreadable, with what the single decoder says
        "malformed history entry": entry[:5],
        "encoding version 1": b"\x01" + entry[1:],
        "unknown channel 9": entry[:17] + b"\x09" + entry[18:],
        "8 text fields": entry + b"\x1fextra",
        "codec can't decode": entry[:18] + b"\xff\xfe" + entry[18:],
    }
    mixed = [*bad.values()]
    mixed[1:1] = good[:2]
    mixed.append(good[2])

    entries, refused = decode_history_entries(mixed)

    assert entries == [decode_history_entry(data) for data in good]
    assert [e.amount_minor for e in entries] == [100, 101, 102]
    assert refused == len(bad)
    for message, data in bad.items():
        with pytest.raises(ValueError, match=message):
            decode_history_entry(data)


def test_encode_rejects_separator_inside_a_field() -> None:
    with pytest.raises(ValueError, match="separator"):
        encode_history_entry(history_entry(tx(T0, merchant="a\x1fb")))


def test_screening_features_without_history() -> None:
    feats = screening_features(tx(T0, 1000, device="dev-9", ip_country="GB"), [])
    assert feats.shape == (N_SCREENING_FEATURES,)
    assert feats.dtype == np.float32
    assert np.isfinite(feats).all()
    assert feats[S["history_count"]] == 0.0
    assert feats[S["count_24h"]] == 0.0
    assert feats[S["device_new"]] == 1.0
    assert feats[S["country_new"]] == 1.0
    assert feats[S["ip_country_mismatch"]] == 1.0
    assert feats[S["channel_card_present"]] == 1.0
    assert feats[S["mcc_grocery"]] == 1.0
    assert feats[S["log_secs_since_last"]] > math.log1p(30 * 86_400)


def test_screening_velocity_windows_and_amounts() -> None:
    now = T0 + 30 * DAY
    history = newest_first(
        tx(now - 5 * MINUTE, 100, merchant="m-a"),  # small, 10 min
        tx(now - 8 * MINUTE, 200, merchant="m-b"),  # small, 10 min
        tx(now - 30 * MINUTE, 5000, merchant="m-a"),  # 1 h
        tx(now - 5 * HOUR, 3000),  # 24 h
        tx(now - 3 * DAY, 4000, country="FR", currency="EUR"),  # 7 d, other country
        tx(now - 20 * DAY, 2000),  # outside every window
    )
    current = tx(now, 1_000_000, merchant="m-a", device="dev-new")
    feats = screening_features(current, history)

    assert feats[S["history_count"]] == pytest.approx(6 / HISTORY_LEN)
    assert feats[S["count_10m"]] == 2
    assert feats[S["count_1h"]] == 3
    assert feats[S["count_24h"]] == 4
    assert feats[S["count_7d"]] == 5
    assert feats[S["small_count_1h"]] == 2
    assert feats[S["small_count_24h"]] == 2
    assert feats[S["distinct_merchants_1h"]] == 2
    assert feats[S["sum_log_usd_1h"]] == pytest.approx(math.log1p(1 + 2 + 50), rel=1e-6)
    assert feats[S["sum_log_usd_24h"]] == pytest.approx(math.log1p(83), rel=1e-6)
    assert feats[S["log_secs_since_last"]] == pytest.approx(math.log1p(300), rel=1e-6)
    assert feats[S["amount_log_usd"]] == pytest.approx(math.log1p(10_000), rel=1e-6)
    assert feats[S["amount_log_ratio_max"]] == pytest.approx(
        math.log1p(10_000) - math.log1p(50), rel=1e-5
    )
    assert feats[S["amount_log_ratio_median"]] > 4.0
    assert feats[S["amount_zscore"]] > 3.0
    assert feats[S["device_new"]] == 1.0
    assert feats[S["country_new"]] == 0.0
    assert feats[S["country_share"]] == pytest.approx(5 / 6)
    assert feats[S["last_country_differs"]] == 0.0
    assert feats[S["log_secs_since_other_country"]] == pytest.approx(math.log1p(3 * 86_400))
    assert feats[S["merchant_share"]] == pytest.approx(2 / 6)


def test_currency_scaling_reads_major_units() -> None:
    yen = screening_features(tx(T0, 1500, currency="JPY", country="JP"), [])
    usd = screening_features(tx(T0, 1000, currency="USD"), [])
    # 1500 JPY is about 10 USD, not 15.00 of anything.
    assert yen[S["amount_log_usd"]] == pytest.approx(usd[S["amount_log_usd"]], abs=0.05)


def test_screening_travel_and_ip_signals() -> None:
    history = newest_first(*(tx(T0 + i * DAY, 3000) for i in range(10)))
    current = tx(T0 + 9 * DAY + 2 * HOUR, 3000, country="BR", ip_country="RU", device="dev-1")
    feats = screening_features(current, history)
    assert feats[S["country_new"]] == 1.0
    assert feats[S["last_country_differs"]] == 1.0
    assert feats[S["country_share"]] == 0.0
    assert feats[S["log_secs_since_other_country"]] == pytest.approx(math.log1p(7200))
    assert feats[S["ip_country_mismatch"]] == 1.0
    assert feats[S["ip_country_new"]] == 1.0
    assert feats[S["device_new"]] == 0.0
    assert feats[S["mcc_share"]] == 1.0


def test_hour_deviation_is_small_in_habit_and_large_against_it() -> None:
    history = newest_first(*(tx(T0 + i * DAY, 3000) for i in range(20)))
    usual = screening_features(tx(T0 + 20 * DAY, 3000), history)
    odd = screening_features(tx(T0 + 20 * DAY + 12 * HOUR, 3000), history)
    assert usual[S["hour_concentration"]] == pytest.approx(1.0, abs=1e-5)
    assert usual[S["hour_deviation"]] == pytest.approx(0.0, abs=1e-5)
    assert odd[S["hour_deviation"]] == pytest.approx(2.0, abs=1e-5)


def test_sequence_tensor_layout() -> None:
    history = newest_first(*(tx(T0 + i * HOUR, 1000 + i, device=f"d{i % 2}") for i in range(5)))
    current = tx(T0 + 10 * HOUR, 99_900, device="d1")
    seq = sequence_tensor(current, history)
    assert seq.shape == (SEQUENCE_LEN, TOKEN_DIM)
    assert seq.dtype == np.float32
    assert np.isfinite(seq).all()
    assert not seq[: SEQUENCE_LEN - 6].any()  # left padding is all zeros
    assert (seq[-6:, K["real"]] == 1.0).all()
    assert seq[-1, K["is_current"]] == 1.0
    assert not seq[:-1, K["is_current"]].any()
    assert seq[-1, K["log_secs_before_current"]] == 0.0
    # oldest first: time before the current transaction shrinks along the sequence
    assert np.all(np.diff(seq[-6:-1, K["log_secs_before_current"]]) < 0)
    assert seq[-1, K["amount_log_usd"]] == pytest.approx(math.log1p(999.0) / 8, rel=1e-6)
    assert list(seq[-6:, K["same_device_as_current"]]) == [0, 1, 0, 1, 0, 1]
    assert list(seq[-6:, K["first_seen_device"]]) == [1, 1, 0, 0, 0, 0]
    assert seq[-6:, K["channel_card_present"]].all()
    assert seq[-6:, K["mcc_grocery"]].all()


def test_sequence_tensor_keeps_only_history_len() -> None:
    history = newest_first(*(tx(T0 + i * MINUTE, 100 + i) for i in range(HISTORY_LEN + 10)))
    current = tx(T0 + 200 * MINUTE, 500)
    seq = sequence_tensor(current, history)
    assert (seq[:, K["real"]] == 1.0).all()
    assert np.array_equal(seq, sequence_tensor(current, history[:HISTORY_LEN]))
    assert np.array_equal(
        screening_features(current, history), screening_features(current, history[:HISTORY_LEN])
    )


def test_sequence_tensor_without_history_is_one_token() -> None:
    seq = sequence_tensor(tx(T0, 500), [])
    assert seq[:-1].sum() == 0.0
    assert seq[-1, K["real"]] == 1.0
    assert seq[-1, K["first_seen_country"]] == 1.0


def test_card_histories_keep_newest_first_and_trim() -> None:
    histories = CardHistories()
    for i in range(HISTORY_LEN + 5):
        histories.append(tx(T0 + i * MINUTE, card="a"))
    histories.append(tx(T0, card="b"))
    got = histories.history("a")
    assert len(got) == HISTORY_LEN
    assert got[0].timestamp_ms == T0 + (HISTORY_LEN + 4) * MINUTE
    assert got[-1].timestamp_ms == T0 + 5 * MINUTE
    assert len(histories.history("b")) == 1
    assert histories.history("unknown") == []
    assert len(histories) == 2


def random_stream(n: int, seed: int) -> list[Transaction]:
    rng = random.Random(seed)
    ts = T0
    out = []
    for i in range(n):
        ts += rng.randint(0, 20 * MINUTE)
        out.append(
            tx(
                ts,
                rng.randint(1, 500_000),
                card=f"card-{rng.randint(0, 7)}",
                currency=rng.choice(["USD", "EUR", "JPY", "KWD"]),
                country=rng.choice(["US", "FR", "JP"]),
                merchant=f"m-{rng.randint(0, 30)}",
                mcc=rng.choice(["5411", "5812", "5732", "6011", "0000"]),
                channel=rng.choice(list(Channel)),
                device=rng.choice(["", "d1", "d2", "d3"]),
                ip_country=rng.choice(["", "US", "RU"]),
                tx_id=f"tx-{i}",
            )
        )
    return out


def test_online_path_matches_offline_replay() -> None:
    """Parity on a time-ordered stream: a list of encoded entries pushed newest first (what the
    store's script does for in-order arrivals) vs CardHistories."""
    offline = CardHistories()
    redis_lists: dict[str, list[bytes]] = {}
    for t in random_stream(1500, seed=7):
        stored = redis_lists.get(t.card_id, [])[:HISTORY_LEN]  # LRANGE key 0 63
        online_history = [decode_history_entry(b) for b in stored]
        offline_history = offline.history_for(t)
        assert online_history == offline_history
        assert np.array_equal(
            screening_features(t, online_history), screening_features(t, offline_history)
        )
        assert np.array_equal(
            sequence_tensor(t, online_history), sequence_tensor(t, offline_history)
        )
        # after answering: LPUSH + LTRIM 0 63
        redis_lists[t.card_id] = [encode_history_entry(history_entry(t)), *stored][:HISTORY_LEN]
        offline.append(t)


def test_insert_entry_keeps_one_entry_per_id_ordered_by_timestamp() -> None:
    entries: list[HistoryEntry] = []
    for t in (tx(T0 + 2 * MINUTE), tx(T0), tx(T0 + 5 * MINUTE), tx(T0 + MINUTE)):
        assert insert_entry(entries, history_entry(t))
    assert [e.timestamp_ms for e in entries] == [T0 + k * MINUTE for k in (5, 2, 1, 0)]
    # The same id again, even with other fields, changes nothing: the first write wins.
    retry = tx(T0 + 9 * MINUTE, 1, tx_id=f"tx-{T0 + MINUTE}")
    assert not insert_entry(entries, history_entry(retry))
    assert [e.timestamp_ms for e in entries] == [T0 + k * MINUTE for k in (5, 2, 1, 0)]


def test_insert_entry_breaks_timestamp_ties_by_id_bytes() -> None:
    entries: list[HistoryEntry] = []
    for tx_id in ("tx-1", "tx-10", "tx1", "TX-2", "tx-1~", "tx-1."):
        insert_entry(entries, history_entry(tx(T0, tx_id=tx_id)))
    ids = [e.transaction_id for e in entries]
    assert ids == sorted(ids, key=str.encode, reverse=True)
    assert ids == ["tx1", "tx-1~", "tx-10", "tx-1.", "tx-1", "TX-2"]


def test_insert_entry_keeps_the_history_len_newest() -> None:
    entries: list[HistoryEntry] = []
    for i in range(HISTORY_LEN):
        insert_entry(entries, history_entry(tx(T0 + (i + 1) * MINUTE)))
    assert not insert_entry(entries, history_entry(tx(T0)))  # older than all 64: not kept
    assert insert_entry(entries, history_entry(tx(T0 + 30 * MINUTE + 1)))  # evicts the oldest
    assert len(entries) == HISTORY_LEN
    assert entries[-1].timestamp_ms == T0 + 2 * MINUTE
    assert entries[34].timestamp_ms == T0 + 30 * MINUTE + 1


def test_visible_history_leaves_out_newer_entries_and_the_transaction_itself() -> None:
    stored = newest_first(*(tx(T0 + k * MINUTE) for k in range(5)))
    assert visible_history(tx(T0 + 9 * MINUTE), stored) is stored  # nothing left out: no copy
    late = tx(T0 + 2 * MINUTE + 1)
    assert [e.timestamp_ms for e in visible_history(late, stored)] == [
        T0 + 2 * MINUTE,
        T0 + MINUTE,
        T0,
    ]
    itself = tx(T0 + 2 * MINUTE)  # a retry whose own entry is stored
    assert [e.timestamp_ms for e in visible_history(itself, stored)] == [T0 + MINUTE, T0]
    same_ms = tx(T0 + 2 * MINUTE, tx_id="other")  # another transaction of that millisecond
    assert len(visible_history(same_ms, stored)) == 3


def test_card_histories_give_in_order_values_to_shuffled_and_repeated_streams() -> None:
    """Cards with at most HISTORY_LEN transactions: replaying a stream shuffled, with every
    transaction twice, or a second time over the same histories gives each transaction the
    features it had in time order."""
    stream = [t for t in random_stream(1500, seed=11) if t.card_id in ("card-1", "card-2")]
    by_card: dict[str, list[Transaction]] = {}
    for t in stream:
        by_card.setdefault(t.card_id, []).append(t)
    stream = [t for txs in by_card.values() for t in txs[:HISTORY_LEN]]
    stream.sort(key=lambda t: t.timestamp_ms)
    in_order = CardHistories()
    expected = {}
    for t in stream:
        expected[t.transaction_id] = screening_features(t, in_order.history_for(t))
        in_order.append(t)
    for t in stream:  # a replay against the filled histories
        np.testing.assert_array_equal(
            screening_features(t, in_order.history_for(t)), expected[t.transaction_id]
        )
    shuffled = CardHistories()
    messy = stream * 2
    random.Random(3).shuffle(messy)
    for t in messy:
        shuffled.append(t)
    for t in stream:
        np.testing.assert_array_equal(
            screening_features(t, shuffled.history_for(t)), expected[t.transaction_id]
        )
    for card in by_card:
        assert shuffled.history(card) == in_order.history(card)
