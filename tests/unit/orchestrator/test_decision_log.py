"""The decision log against its in-memory sink (no sockets): batching, spooling while the sink
is down or slow, replay when it returns, bounds, and the flush at exit."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cascade.decision_record import METHOD_SCORE, PendingDecision, decode_decision, encode_decision
from cascade.errors import ConfigurationError
from cascade.settings import DecisionLogSettings
from cascade.v1 import scoring_pb2
from orchestrator import decision_log
from orchestrator.decision_log import DecisionLog, InMemorySink
from tests.conftest import make_wire_transaction

FEATURES = np.linspace(0, 1, 47, dtype=np.float32)


def settings(tmp_path: Path, **overrides: object) -> DecisionLogSettings:
    fields: dict[str, object] = {
        "spool_dir": tmp_path / "spool",
        "batch_interval_ms": 1.0,
        "ack_timeout_s": 0.05,
        "retry_interval_s": 0.02,
        "flush_timeout_s": 1.0,
    }
    fields.update(overrides)
    return DecisionLogSettings(**fields)


def record(log: DecisionLog, i: int) -> None:
    tx = make_wire_transaction(transaction_id=f"tx-{i}")
    answer = scoring_pb2.ScoreResponse(
        transaction_id=f"tx-{i}",
        decision=scoring_pb2.DECISION_APPROVE,
        score=0.01,
        decided_by=scoring_pb2.DECIDED_BY_STAGE1,
        versions=scoring_pb2.ModelVersions(policy="policy-3"),
    )
    log.record(tx, answer, FEATURES, METHOD_SCORE)


async def until(sink: InMemorySink, done: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait, one sink call at a time, until ``done()`` holds."""
    async with asyncio.timeout(timeout_s):
        while not done():
            sink.called.clear()
            await sink.called.wait()


def ids(n: int, start: int = 0) -> set[str]:
    return {f"tx-{i}" for i in range(start, start + n)}


async def test_records_are_published_once_each_on_the_policy_subject(tmp_path: Path) -> None:
    sink = InMemorySink()
    async with DecisionLog(sink, settings(tmp_path), policy_version="policy-3") as log:
        for i in range(300):
            record(log, i)
        await log.flush()
        assert set(sink.messages) == ids(300)
        assert sink.calls < 300 // 2, "records should share publish batches"
        one = sink.messages["tx-7"]
        assert one.subject == "decisions.policy-3"
        decoded = decode_decision(one.payload)
        assert decoded.transaction.transaction_id == "tx-7"
        assert list(decoded.features) == pytest.approx(FEATURES.tolist())
        assert log.published == 300 and log.spooled == 0


async def test_record_is_cheap_and_never_waits(tmp_path: Path) -> None:
    sink = InMemorySink()
    sink.gate = asyncio.Event()  # JetStream hangs: nothing is acknowledged
    async with DecisionLog(sink, settings(tmp_path), policy_version="policy-3") as log:
        rounds_us = []
        for round_ in range(3):
            start = time.perf_counter()
            for i in range(2000):
                record(log, round_ * 2000 + i)
            rounds_us.append((time.perf_counter() - start) / 2000 * 1e6)
        # The bound this checks: the request path's share (~1 µs here) stays far below the
        # 0.6 ms CPU-per-answer target; 50 µs leaves room for a slow shared machine. The best
        # of three rounds: one round once took 63 µs a record when the host stalled mid-loop.
        assert min(rounds_us) < 50, rounds_us
        sink.gate.set()


async def test_while_the_sink_is_down_records_are_spooled_then_replayed(tmp_path: Path) -> None:
    sink = InMemorySink()
    async with DecisionLog(sink, settings(tmp_path), policy_version="policy-3") as log:
        for i in range(50):
            record(log, i)
        await log.flush()
        sink.up = False
        for i in range(50, 250):
            record(log, i)
        await log.flush()
        assert not log.publishing
        assert log.spooled == 200 and not log.spool.empty
        assert set(sink.messages) == ids(50)
        sink.up = True
        await until(sink, lambda: log.spool.empty)
        assert set(sink.messages) == ids(250)
        assert log.replayed == 200 and log.publishing
        for i in range(250, 260):
            record(log, i)
        await log.flush()
        assert set(sink.messages) == ids(260)


@pytest.mark.wallclock
async def test_a_slow_sink_sends_its_batch_to_the_spool_after_the_ack_timeout(
    tmp_path: Path,
) -> None:
    sink = InMemorySink()
    sink.gate = asyncio.Event()
    async with DecisionLog(sink, settings(tmp_path), policy_version="policy-3") as log:
        started = time.monotonic()
        for i in range(20):
            record(log, i)
        await log.flush()
        assert log.spooled == 20
        # The cap checked: a batch waits one ack timeout (0.05 s), plus scheduling slack.
        assert time.monotonic() - started < 0.05 + 1.0
        sink.gate.set()
        await until(sink, lambda: log.spool.empty)
        assert set(sink.messages) == ids(20)


async def test_past_the_buffer_bound_records_are_dropped_and_counted(tmp_path: Path) -> None:
    sink = InMemorySink()
    sink.gate = asyncio.Event()
    cfg = settings(tmp_path, buffer_max_records=100, batch_max_records=100)
    async with DecisionLog(sink, cfg, policy_version="policy-3") as log:
        for i in range(150):  # no await: the background task cannot drain the buffer meanwhile
            record(log, i)
        assert log.dropped == {"buffer_full": 50}
        sink.gate.set()
        await log.flush()
    assert set(sink.messages) == ids(100)


async def test_past_the_spool_bound_records_are_dropped_and_counted(tmp_path: Path) -> None:
    sink = InMemorySink()
    sink.up = False
    cfg = settings(tmp_path, spool_max_bytes=20_000)
    async with DecisionLog(sink, cfg, policy_version="policy-3") as log:
        for i in range(200):
            record(log, i)
        await log.flush()
        assert log.spooled > 0
        assert log.dropped["spool_full"] == 200 - log.spooled
        assert log.spool.size_bytes <= 20_000
        kept = log.spooled
        sink.up = True
        await until(sink, lambda: log.spool.empty)
    assert set(sink.messages) == ids(kept)  # the oldest were kept


@pytest.mark.wallclock
async def test_exit_flushes_the_buffer_to_the_sink_at_once(tmp_path: Path) -> None:
    sink = InMemorySink()
    cfg = settings(tmp_path, batch_interval_ms=10_000)  # nothing would be sent before exit
    async with DecisionLog(sink, cfg, policy_version="policy-3") as log:
        for i in range(40):
            record(log, i)
        await asyncio.sleep(0)  # the publisher starts lingering over the 10 s batch interval
        started = time.monotonic()
    # The cap checked: the exit ends the linger; it does not wait out the 10 s interval.
    assert time.monotonic() - started < 1.0
    assert set(sink.messages) == ids(40)


async def test_a_full_batch_is_sent_without_waiting_out_the_interval(tmp_path: Path) -> None:
    sink = InMemorySink()
    cfg = settings(tmp_path, batch_interval_ms=10_000, batch_max_records=50)
    async with DecisionLog(sink, cfg, policy_version="policy-3") as log:
        for i in range(50):
            record(log, i)
        async with asyncio.timeout(1.0):  # the cap: well under the 10 s interval
            await log.flush()
        assert set(sink.messages) == ids(50)


async def test_exit_with_the_sink_down_spools_and_the_next_start_replays(tmp_path: Path) -> None:
    sink = InMemorySink()
    sink.up = False
    cfg = settings(tmp_path, flush_timeout_s=0.2)
    async with DecisionLog(sink, cfg, policy_version="policy-3") as log:
        for i in range(30):
            record(log, i)
    assert sink.messages == {}
    assert log.spooled == 30
    sink.up = True
    async with DecisionLog(sink, cfg, policy_version="policy-3") as again:
        await until(sink, lambda: again.spool.empty)
    assert set(sink.messages) == ids(30)


@pytest.mark.wallclock
async def test_a_sink_that_hangs_at_exit_leaves_the_buffer_in_the_spool(tmp_path: Path) -> None:
    sink = InMemorySink()
    sink.gate = asyncio.Event()
    cfg = settings(tmp_path, flush_timeout_s=0.1, ack_timeout_s=30.0)
    started = time.monotonic()
    async with DecisionLog(sink, cfg, policy_version="policy-3") as log:
        for i in range(25):
            record(log, i)
    # The cap checked: exit takes the flush timeout (0.1 s), not the 30 s ack timeout.
    assert time.monotonic() - started < 0.1 + 1.0
    assert log.spooled == 25 and sink.messages == {}


def test_a_policy_version_that_is_no_subject_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not a NATS subject"):
        DecisionLog(InMemorySink(), settings(tmp_path), policy_version="policy *")


async def test_a_large_batch_is_encoded_with_the_event_loop_let_run_in_between(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 512 records encoded at once held the loop ~10 ms (every Score call with it). Counted in
    # records, not time: between two turns of a ticker task, at most one 32-record slice.
    encoded = 0

    def counting_encode(pending: PendingDecision) -> bytes:
        nonlocal encoded
        encoded += 1
        return encode_decision(pending)

    monkeypatch.setattr(decision_log, "encode_decision", counting_encode)
    seen: list[int] = []

    async def ticker() -> None:
        while True:
            seen.append(encoded)
            await asyncio.sleep(0)

    sink = InMemorySink()
    cfg = settings(tmp_path, batch_interval_ms=10_000, batch_max_records=512)
    async with DecisionLog(sink, cfg, policy_version="policy-3") as log:
        tick = asyncio.create_task(ticker())
        for i in range(512):
            record(log, i)
        async with asyncio.timeout(5.0):
            await log.flush()
        tick.cancel()
    assert set(sink.messages) == ids(512) and sink.calls == 2  # ensure_stream, one publish
    steps = [b - a for a, b in itertools.pairwise([0, *seen, encoded])]
    assert sum(steps) == 512 and max(steps) == 32


@pytest.mark.parametrize("passes_before_exit", [0, 1, 2, 5, 10])
async def test_a_shutdown_during_encoding_loses_no_record(
    tmp_path: Path, passes_before_exit: int
) -> None:
    # The shutdown's flush timeout is 0: the publisher is cancelled wherever it stands, part
    # way through encoding a 600-record batch or sending it; each record ends up sent or
    # spooled, exactly once.
    sink = InMemorySink()
    sink.gate = asyncio.Event()  # a JetStream that does not acknowledge before the exit
    cfg = settings(tmp_path, batch_interval_ms=0.0, batch_max_records=600, flush_timeout_s=0.0)
    async with DecisionLog(sink, cfg, policy_version="policy-3") as log:
        for i in range(600):
            record(log, i)
        for _ in range(passes_before_exit):
            await asyncio.sleep(0)
    assert log.spooled == 600 and sink.messages == {}
    sink.gate.set()
    async with DecisionLog(sink, cfg, policy_version="policy-3") as again:
        await until(sink, lambda: again.spool.empty)
    assert set(sink.messages) == ids(600) and sink.published == 600
