"""The decision spool on a temporary folder: frames, bounds, replay order, slots, torn writes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from orchestrator.decision_spool import DecisionSpool, SpooledRecord, encode_frame, parse_frames


def records(n: int, start: int = 0, size: int = 100) -> list[SpooledRecord]:
    return [
        SpooledRecord("decisions.policy-3", f"tx-{i}", bytes([i % 256]) * size)
        for i in range(start, start + n)
    ]


_open = ExitStack()


@pytest.fixture(autouse=True)
def _close_spools() -> Iterator[None]:
    yield
    _open.close()


def opened(root: Path, *, max_bytes: int = 1 << 20, segment_bytes: int = 4096) -> DecisionSpool:
    """An open spool on ``root``, closed at the end of the test unless the test closes it."""
    spool = DecisionSpool(root, max_bytes=max_bytes, segment_bytes=segment_bytes)
    return _open.enter_context(spool)


def drain(spool: DecisionSpool, limit: int = 7) -> list[SpooledRecord]:
    out: list[SpooledRecord] = []
    while True:
        batch, position = spool.read(limit)
        if not batch:
            return out
        out += batch
        spool.commit(position)


def test_frames_round_trip_and_a_torn_or_flipped_frame_is_found() -> None:
    recs = [*records(3), SpooledRecord("decisions.p", None, b"")]
    data = b"".join(encode_frame(r) for r in recs)
    parsed = parse_frames(data)
    assert parsed.records == recs and parsed.consumed == len(data)
    assert not parsed.corrupt and not parsed.incomplete
    torn = parse_frames(data[:-3] if recs[-1].payload else data[: len(data) - 5])
    assert torn.records == recs[:3] and torn.incomplete and not torn.corrupt
    flipped = bytearray(data)
    flipped[len(encode_frame(recs[0])) + 12] ^= 0xFF
    bad = parse_frames(bytes(flipped))
    assert bad.records == recs[:1] and bad.corrupt
    assert parse_frames(data, limit=2).records == recs[:2]


def test_everything_appended_is_read_back_in_order_across_segments(tmp_path: Path) -> None:
    spool = opened(tmp_path, segment_bytes=1000)
    assert spool.empty
    spool.append(records(30))
    spool.append(records(30, start=30))
    assert len(list(spool.slot_dir.glob("seg-*.spool"))) > 1  # type: ignore[union-attr]
    assert not spool.empty
    assert drain(spool) == records(60)
    assert spool.empty
    assert spool.size_bytes == 0
    assert list(spool.slot_dir.glob("seg-*.spool")) == []


def test_appends_during_a_replay_are_read_after_it(tmp_path: Path) -> None:
    spool = opened(tmp_path, segment_bytes=1 << 20)
    spool.append(records(5))
    batch, position = spool.read(3)
    spool.append(records(5, start=5))  # arrives while the first three are being published
    spool.commit(position)
    assert batch + drain(spool) == records(10)


def test_an_uncommitted_read_is_read_again(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    spool.append(records(4))
    first, _ = spool.read(4)  # JetStream did not acknowledge them all: no commit
    again, _ = spool.read(4)
    assert first == again == records(4)


def test_the_bound_refuses_what_does_not_fit_and_keeps_the_oldest(tmp_path: Path) -> None:
    frame = len(encode_frame(records(1)[0]))
    spool = opened(tmp_path, max_bytes=frame * 10, segment_bytes=1 << 20)
    assert spool.append(records(6)) == 0
    assert spool.append(records(6, start=6)) == 2
    assert spool.size_bytes == frame * 10
    assert spool.append(records(1, start=12)) == 1
    assert drain(spool) == records(10)
    assert spool.append(records(3, start=20)) == 0  # room again once replayed


def test_a_leftover_spool_is_replayed_by_the_next_process(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    spool.append(records(20))
    spool.close()
    again = opened(tmp_path)
    assert again.slot_dir == spool.slot_dir
    assert drain(again) == records(20)


def test_processes_take_separate_slots_and_adopt_orphaned_ones(tmp_path: Path) -> None:
    first, second = opened(tmp_path), opened(tmp_path)
    assert first.slot_dir != second.slot_dir
    first.append(records(3))
    second.append(records(3, start=3))
    second.close()  # slot-1's process is gone; slot-1 is free
    first.close()
    # One process now runs: it takes slot-0 and adopts slot-1's segments.
    only = opened(tmp_path)
    assert sorted(drain(only), key=lambda r: r.msg_id or "") == records(6)


def test_a_torn_tail_of_a_leftover_segment_is_counted_and_skipped(tmp_path: Path) -> None:
    spool = opened(tmp_path, segment_bytes=1 << 20)
    spool.append(records(3))
    spool.close()
    (segment,) = spool.slot_dir.glob("seg-*.spool")  # type: ignore[union-attr]
    with segment.open("ab") as fh:
        fh.write(encode_frame(records(1, start=3)[0])[:-10])  # the crash cut this write short
    again = opened(tmp_path)
    assert drain(again) == records(3)
    assert again.corrupt_records == 1
    assert again.empty


@pytest.mark.parametrize("limit", [1, 1000])
def test_read_limits_the_batch(tmp_path: Path, limit: int) -> None:
    spool = opened(tmp_path, segment_bytes=1 << 20)
    spool.append(records(10))
    batch, _ = spool.read(limit)
    assert len(batch) == min(limit, 10)
