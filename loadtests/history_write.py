"""What the card-history write costs Redis: the ordered, de-duplicating write script of
:mod:`orchestrator.online_store` against the layout-1 write it replaced (LPUSH + LTRIM), on a
real redis-server, with simulated entries written through :class:`RedisOnlineStore` in batches of
64 (as the post-answer writer sends them).

Usage: ``python -m loadtests.history_write [--cards 1000]``. Prints, per phase, Redis's own time
per script call (``INFO commandstats``, so the client's CPU and the network are not in it), and
the memory per card key once every card holds a full history.

Phases: every transaction in time order; the same stream arriving late (each transaction up to
a few hours late, so many are inserted behind newer ones); the whole stream again (every write a
retry, skipped); every transaction of a card at one timestamp (ties are ordered by id, the
script's slowest case). The layout-1 script runs the in-order phase only: it cannot do the others.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import random
import secrets
import struct
import sys
from collections.abc import Sequence

from cascade.features import HISTORY_LEN, encode_history_entry, history_entry
from cascade.pseudonym import Pseudonymizer, PseudonymKey
from cascade.transaction import Transaction
from devstack.servers import RedisServer
from orchestrator.online_store import RedisOnlineStore, StoreWrite, card_history_key
from orchestrator.redis_pipeline import Arg, PipelinedRedis
from training.simulator import SimulationConfig, simulate

# The write this layout replaced, for comparison.
_LAYOUT1_WRITE_SCRIPT = """
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[2]) - 1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""
_BATCH = 64


def _layout1_entry(tx: Transaction) -> bytes:
    """The entry as layout 1 stored it: no transaction id, little-endian head."""
    texts = (tx.currency, tx.merchant_id, tx.merchant_category, tx.country, tx.device_id)
    head = struct.pack("<BqqB", 1, tx.timestamp_ms, tx.amount_minor, tx.channel)
    return head + "\x1f".join((*texts, tx.ip_country)).encode()


async def _stats(redis: PipelinedRedis) -> dict[str, str]:
    (info,) = await redis.execute([("INFO", "commandstats")], 5.0)
    assert isinstance(info, bytes)
    return dict(line.split(":", 1) for line in info.decode().splitlines() if ":" in line)


def _usec_per_call(stats: dict[str, str], command: str) -> tuple[int, float]:
    fields = dict(kv.split("=") for kv in stats.get(f"cmdstat_{command}", "").split(",") if kv)
    return int(fields.get("calls", 0)), float(fields.get("usec_per_call", 0.0))


async def _memory(redis: PipelinedRedis, keys: Sequence[str]) -> tuple[float, str]:
    replies = await redis.execute([("MEMORY", "USAGE", k) for k in keys], 5.0)
    sizes = [r for r in replies if isinstance(r, int)]
    (encoding,) = await redis.execute([("OBJECT", "ENCODING", keys[0])], 5.0)
    return sum(sizes) / max(len(sizes), 1), encoding.decode() if isinstance(encoding, bytes) else ""


async def _phase(
    redis: PipelinedRedis,
    name: str,
    send: Sequence[Sequence[Arg]] | Sequence[StoreWrite],
    store: RedisOnlineStore | None,
) -> None:
    await redis.execute([("CONFIG", "RESETSTAT")], 5.0)
    for start in range(0, len(send), _BATCH):
        chunk = send[start : start + _BATCH]
        if store is not None:
            await store.write([w for w in chunk if isinstance(w, StoreWrite)])
        else:
            commands = [tuple(c) for c in chunk if not isinstance(c, StoreWrite)]
            replies = await redis.execute(commands, 5.0)
            assert not any(isinstance(r, Exception) for r in replies), replies
    calls, usec = _usec_per_call(await _stats(redis), "evalsha")
    print(f"  {name:<34} {calls:>7} script calls  {usec:6.2f} us each (Redis's time)")


async def measure(cards: int) -> None:
    # As the orchestrator stores them: card and device ids as tokens (a key made for this run).
    pseudonyms = Pseudonymizer(PseudonymKey("k1", secrets.token_hex(32).encode()))
    simulated = simulate(SimulationConfig(seed=7, n_cards=cards, n_days=60))
    stream = [pseudonyms.transaction(r.tx) for r in simulated]
    rng = random.Random(1)
    late = sorted(stream, key=lambda tx: tx.timestamp_ms + rng.expovariate(1 / 10_800_000))
    first_ms: dict[str, int] = {}
    for tx in stream:
        first_ms.setdefault(tx.card_id, tx.timestamp_ms)
    ties = [dataclasses.replace(tx, timestamp_ms=first_ms[tx.card_id]) for tx in stream]
    sizes = [len(encode_history_entry(history_entry(tx))) for tx in stream]
    old_sizes = [len(_layout1_entry(tx)) for tx in stream]
    print(
        f"{len(stream)} transactions of {cards} cards, HISTORY_LEN {HISTORY_LEN}; entries "
        f"{sum(old_sizes) / len(stream):.0f} B (layout 1), {sum(sizes) / len(stream):.0f} B "
        "(layout 2, with the transaction id) on average"
    )

    def writes(txs: Sequence[Transaction], feature_set: str) -> list[StoreWrite]:
        return [
            StoreWrite(
                card_history_key(tx.card_id, feature_set), encode_history_entry(history_entry(tx))
            )
            for tx in txs
        ]

    async with (
        RedisServer() as server,
        PipelinedRedis(server.url, connections=1) as redis,
        RedisOnlineStore(server.url, cache_ttl_s=600, feature_ttl_s=600) as store,
    ):
        sha = hashlib.sha1(_LAYOUT1_WRITE_SCRIPT.encode()).hexdigest()
        await redis.execute([("SCRIPT", "LOAD", _LAYOUT1_WRITE_SCRIPT)], 5.0)
        old: list[Sequence[Arg]] = [
            ("EVALSHA", sha, 1, f"old:{tx.card_id}", _layout1_entry(tx), HISTORY_LEN, 600)
            for tx in stream
        ]
        print("layout 1 (LPUSH + LTRIM, arrival order, no de-duplication):")
        await _phase(redis, "in time order", old, None)
        old_keys = sorted({f"old:{tx.card_id}" for tx in stream})
        print("layout 2 (ordered by timestamp, one entry per transaction id):")
        await store.write(writes(stream[:1], "fs-warm"))  # loads the script
        await _phase(redis, "in time order", writes(stream, "fs-a"), store)
        await _phase(redis, "arriving late", writes(late, "fs-b"), store)
        await _phase(redis, "the stream again (all retries)", writes(stream, "fs-a"), store)
        await _phase(redis, "one timestamp per card (all ties)", writes(ties, "fs-c"), store)
        new_keys = sorted({card_history_key(tx.card_id, "fs-a") for tx in stream})
        await redis.execute([("CONFIG", "RESETSTAT")], 5.0)
        await redis.execute([("LRANGE", k, 0, HISTORY_LEN - 1) for k in new_keys], 5.0)
        _, lrange_us = _usec_per_call(await _stats(redis), "lrange")
        old_memory, old_encoding = await _memory(redis, old_keys)
        new_memory, new_encoding = await _memory(redis, new_keys)
    print(f"for scale, the lookup's LRANGE of a full history: {lrange_us:.2f} us (Redis's time)")
    print(f"memory per card key: layout 1 {old_memory:.0f} B ({old_encoding}), ", end="")
    print(f"layout 2 {new_memory:.0f} B ({new_encoding})")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the measurement and print it."""
    parser = argparse.ArgumentParser(prog="python -m loadtests.history_write")
    parser.add_argument("--cards", type=int, default=1000, help="simulated cards")
    args = parser.parse_args(argv)
    asyncio.run(measure(args.cards))
    return 0


if __name__ == "__main__":
    sys.exit(main())
