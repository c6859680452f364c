"""The Redis online store's history write on a real Redis: the script keeps each card's history
by the same rule as its in-memory twin and the offline replay (:func:`insert_entry`): one entry
per transaction id, ordered by ``(timestamp_ms, transaction_id)`` newest first, whatever order the
writes come in, concurrent or not, and one script call per entry."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import time
import uuid
from pathlib import Path

import pytest

from cascade.features import (
    HISTORY_LEN,
    CardHistories,
    decode_history_entry,
    encode_history_entry,
    history_entry,
)
from cascade.transaction import Transaction
from devstack.servers import RedisServer
from orchestrator.online_store import (
    WRITE_SCRIPT,
    InMemoryOnlineStore,
    RedisOnlineStore,
    StoreWrite,
    card_history_key,
)
from orchestrator.redis_pipeline import PipelinedRedis
from tests.conftest import make_transaction

pytestmark = pytest.mark.integration

T0 = 1_767_225_600_000


def _tx(card: str, tx_id: str, timestamp_ms: int, amount_minor: int = 1000) -> Transaction:
    return make_transaction(
        transaction_id=tx_id, card_id=card, timestamp_ms=timestamp_ms, amount_minor=amount_minor
    )


def _write(tx: Transaction, key: str, *, cache: bool = False) -> StoreWrite:
    entry = encode_history_entry(history_entry(tx))
    if not cache:
        return StoreWrite(key, entry)
    return StoreWrite(key, entry, f"out:test:{tx.transaction_id}", b"answer")


def _messy_stream(rng: random.Random, card: str, n: int) -> list[Transaction]:
    """Out of order, with exact retries, same-id retries carrying other fields, same-millisecond
    ties and ids that are prefixes of one another (``tx-1`` / ``tx-10``) or differ only in
    punctuation (what a locale-aware comparison would mis-order)."""
    txs: list[Transaction] = []
    for i in range(n):
        tx_id = rng.choice([f"tx-{i}", f"tx{i}", f"tx-{i}0", f"TX_{i}", f"tx.{i}~"])
        timestamp_ms = T0 + rng.randint(0, 200) * 60_000
        txs.append(_tx(card, tx_id, timestamp_ms, rng.randint(1, 10**6)))
        if rng.random() < 0.2:  # an exact retry, now or later
            txs.insert(rng.randint(0, len(txs)), txs[-1])
        if rng.random() < 0.05:  # the same id with another timestamp and amount
            txs.append(_tx(card, tx_id, timestamp_ms + rng.randint(-10, 10) * 60_000, 7))
    rng.shuffle(txs)
    return txs


async def test_history_write_follows_the_twin_and_the_offline_rule(
    redis_server: RedisServer,
) -> None:
    rng = random.Random(5)
    twin = InMemoryOnlineStore()
    offline = CardHistories()
    async with RedisOnlineStore(redis_server.url, cache_ttl_s=60, feature_ttl_s=60) as store:
        for c in range(6):
            card = f"card-{uuid.uuid4().hex[:8]}"
            key = card_history_key(card, "fs-test")
            for tx in _messy_stream(rng, card, 40 + 20 * c):
                await store.write([_write(tx, key)])
                await twin.write([_write(tx, key)])
                offline.append(tx)
            (lookup,) = await store.lookup([("out:none", key)], timeout_s=1.0)
            assert lookup.history == twin.histories[key]
            assert [decode_history_entry(b) for b in lookup.history] == offline.history(card)
            stored = offline.history(card)
            assert len({e.transaction_id for e in stored}) == len(stored) <= HISTORY_LEN
            keys = [(e.timestamp_ms, e.transaction_id) for e in stored]
            assert keys == sorted(keys, reverse=True)
    assert max(len(h) for h in twin.histories.values()) == HISTORY_LEN  # the cap was exercised


async def test_concurrent_writes_of_one_card_keep_one_entry_per_id(
    redis_server: RedisServer,
) -> None:
    card = f"card-{uuid.uuid4().hex[:8]}"
    key = card_history_key(card, "fs-test")
    txs = [_tx(card, f"tx-{i}", T0 + (i * 7919 % 50) * 1000) for i in range(50)]
    async with (
        RedisOnlineStore(redis_server.url, cache_ttl_s=60, feature_ttl_s=60) as a,
        RedisOnlineStore(redis_server.url, cache_ttl_s=60, feature_ttl_s=60) as b,
    ):
        # Every transaction written 4 times, from two stores (4 connections), all at once.
        await asyncio.gather(
            *(store.write([_write(tx, key, cache=True)]) for tx in txs * 2 for store in (a, b))
        )
        (lookup,) = await a.lookup([("out:test:tx-3", key)], timeout_s=1.0)
    offline = CardHistories()
    for tx in txs:
        offline.append(tx)
    assert [decode_history_entry(b) for b in lookup.history] == offline.history(card)
    assert len(lookup.history) == 50
    assert lookup.cached == b"answer"


async def test_a_skipped_entry_still_stores_the_answer(redis_server: RedisServer) -> None:
    card = f"card-{uuid.uuid4().hex[:8]}"
    key = card_history_key(card, "fs-test")
    first = _tx(card, "tx-1", T0)
    async with RedisOnlineStore(redis_server.url, cache_ttl_s=60, feature_ttl_s=60) as store:
        await store.write([_write(first, key)])
        await store.write([_write(first, key, cache=True)])  # a retry, answered from stage 1
        (lookup,) = await store.lookup([("out:test:tx-1", key)], timeout_s=1.0)
    assert lookup.cached == b"answer"
    assert lookup.history == [encode_history_entry(history_entry(first))]


async def test_each_entry_is_one_script_call(redis_server: RedisServer) -> None:
    card = f"card-{uuid.uuid4().hex[:8]}"
    key = card_history_key(card, "fs-test")
    writes = [_write(_tx(card, f"tx-{i}", T0 + (i % 7) * 1000), key) for i in range(100)]
    async with (
        RedisOnlineStore(redis_server.url, cache_ttl_s=60, feature_ttl_s=60) as store,
        PipelinedRedis(redis_server.url, connections=1) as redis,
    ):
        await store.write(writes[:1])  # the script is loaded
        await redis.execute([("CONFIG", "RESETSTAT")], 1.0)
        await store.write(writes[1:])
        (info,) = await redis.execute([("INFO", "commandstats")], 1.0)
    assert isinstance(info, bytes)
    stats = dict(line.split(":", 1) for line in info.decode().splitlines() if ":" in line)
    assert stats["cmdstat_evalsha"].startswith("calls=99,")


async def test_requests_of_one_loop_pass_share_one_connection(redis_server: RedisServer) -> None:
    """Two connections, requests made in one pass: they join the write already being built
    (one system call, in order), rather than spreading over the least busy connections."""
    async with PipelinedRedis(redis_server.url, connections=2) as redis:
        ids = await asyncio.gather(*(redis.execute([("CLIENT", "ID")], 1.0) for _ in range(4)))
        assert len({reply for (reply,) in ids}) == 1
        # Once that write is out, a new request goes to the least busy connection: the other.
        blocked = [("CLIENT", "ID"), ("BLPOP", f"empty-{uuid.uuid4().hex}", "0.2")]
        first = asyncio.ensure_future(redis.execute(blocked, 1.0))
        for _ in range(2):
            await asyncio.sleep(0)  # the first request is queued, then written
        (second,) = await redis.execute([("CLIENT", "ID")], 1.0)
        busy_id, nothing = await first
    assert nothing is None
    assert second != busy_id


async def test_the_write_script_is_loaded_when_the_store_opens(redis_server: RedisServer) -> None:
    async with PipelinedRedis(redis_server.url, connections=1) as redis:
        await redis.execute([("SCRIPT", "FLUSH")], 1.0)
        async with RedisOnlineStore(redis_server.url, cache_ttl_s=60, feature_ttl_s=60):
            sha = hashlib.sha1(WRITE_SCRIPT.encode()).hexdigest()
            ((loaded,),) = [await redis.execute([("SCRIPT", "EXISTS", sha)], 1.0)]
    assert loaded == [1]


@pytest.mark.parametrize(("grace_s", "outcome"), [(0.0, "timeout"), (0.040, "reply")])
async def test_a_cap_timer_that_fired_late_waits_out_its_grace_for_redis(
    tmp_path: Path, grace_s: float, outcome: str
) -> None:
    """The whole machine away: Redis stopped and our loop stuck for 20 ms just after the write,
    Redis back 1 ms after that. The 5 ms cap's timer fires late; with a grace it waits a little
    longer (STALL_GRACE_S) and gets the reply, without it fails before Redis could answer."""
    async with RedisServer(log_dir=tmp_path) as server:
        pid = server.pid
        assert pid is not None
        async with PipelinedRedis(server.url, connections=1) as redis:
            await redis.execute([("PING",)], 1.0)
            loop = asyncio.get_running_loop()
            os.kill(pid, signal.SIGSTOP)
            try:
                request = asyncio.ensure_future(redis.execute([("PING",)], 0.005, grace_s))
                await asyncio.sleep(0)  # written
                loop.call_soon(time.sleep, 0.020)
                loop.call_later(0.021, os.kill, pid, signal.SIGCONT)
                try:
                    got = "reply" if await request == [b"PONG"] else "wrong reply"
                except TimeoutError:
                    got = "timeout"
            finally:
                os.kill(pid, signal.SIGCONT)
    assert got == outcome
