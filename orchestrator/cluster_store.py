"""The online store on Redis Cluster: redis-py's cluster client, one pipeline per node.

The same :class:`~orchestrator.online_store.OnlineStore` as
:class:`~orchestrator.online_store.RedisOnlineStore`, with the same keys and the same write
script, for a Redis Cluster (``redis.cluster``). The keys' hash tag (the card id in braces, see
:mod:`orchestrator.online_store`) puts a card's cached answers and its history in one slot, so
each lookup's GET and LRANGE go to one node and the write script's keys never cross slots.
redis-py's :class:`~redis.asyncio.cluster.RedisCluster` pipeline groups the commands by the node
that owns their slot and sends one pipeline to each node at once; a lookup costs one round trip
to each node it touches.

Inside a latency budget nothing waits: the client makes no retries of its own (its default
closes every connection and sleeps 0.25 s before a retry) and every call is cut at its timeout.
What fails (a master killed, its slots not served until a replica is promoted, ``CLUSTERDOWN``,
a redirection the client could not follow in time) leaves as a ``DependencyError`` through
:func:`cascade.errors.translate_redis_errors`, and asks an owned background task to refresh the
slot map (``CLUSTER SLOTS``), at most every ``refresh_interval_s`` while failures go on: once a
replica took over, the next refresh points its slots at it, with no restart. A stale map that
still reaches a live node is corrected by the ``MOVED`` reply itself (redis-py follows it).

While a pseudonym key is rotated, a card's previous-token history lives in another slot (its
hash tag is the other token), so it cannot be ``COPY``-ed as on a single node: a lookup reads it
in the same pipeline (another node, perhaps), and a write that moves it reads it first and hands
its entries to a small script on the new key's node, which adopts them only if that key does not
exist yet, before the write script adds the entry. Two round trips per moving write, only while
rotating and off the request path.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Final

import redis.exceptions
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from cascade.errors import translate_redis_errors
from cascade.features import HISTORY_LEN
from cascade.lifecycle import cancel_and_wait
from orchestrator.online_store import (
    WRITE_SCRIPT,
    StoreLookup,
    StoreWrite,
    lookup_commands,
    lookups_from_replies,
    write_command,
)
from orchestrator.redis_pipeline import RedisAddress

logger = logging.getLogger(__name__)

# KEYS: the current-token history; ARGV: its TTL, then the previous-token history's entries
# (newest first). Adopted only into a key that does not exist: a card already written under the
# current token keeps what it has.
_ADOPT_SCRIPT: Final = """
if #ARGV > 1 and redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('RPUSH', KEYS[1], unpack(ARGV, 2))
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  return 1
end
return 0
"""

# Failures after which the slot map may be stale: a node gone, a failover under way, a slot
# that moved. (A MOVED the client followed itself never reaches us.)
_TOPOLOGY_ERRORS: Final[tuple[type[Exception], ...]] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterError,
    redis.exceptions.AskError,
    redis.exceptions.TryAgainError,
    redis.exceptions.RedisClusterException,
    OSError,
    TimeoutError,
)


class RedisClusterOnlineStore:
    """:class:`~orchestrator.online_store.OnlineStore` on a Redis Cluster (``urls`` are startup
    nodes: any of its masters or replicas; the client learns the rest)."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        cache_ttl_s: int,
        feature_ttl_s: int,
        connect_timeout_s: float = 0.25,
        write_timeout_s: float = 0.25,
        refresh_interval_s: float = 0.1,
    ) -> None:
        addresses = [RedisAddress.from_url(url) for url in urls]
        if not addresses:
            raise ValueError("a Redis Cluster needs at least one startup node")
        if any(a.db for a in addresses):
            raise ValueError("Redis Cluster has only database 0")
        first = addresses[0]
        self._client = RedisCluster(
            startup_nodes=[ClusterNode(a.host, a.port) for a in addresses],
            username=first.username,
            password=first.password,
            ssl=first.tls,
            # No retries and no backoff: a failed call is a labelled answer now, not a later one.
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=write_timeout_s,
            # A master's slots unserved during a failover must not fail the other masters'.
            require_full_coverage=False,
        )
        self._cache_ttl_s = cache_ttl_s
        self._feature_ttl_s = feature_ttl_s
        self._write_timeout_s = write_timeout_s
        self._refresh_interval_s = refresh_interval_s
        self._write_sha = hashlib.sha1(WRITE_SCRIPT.encode()).hexdigest()
        self._refresh_wanted = asyncio.Event()
        self._refresher: asyncio.Task[None] | None = None
        self.refreshes = 0
        """Slot-map refreshes that succeeded (for tests and logs)."""

    async def __aenter__(self) -> RedisClusterOnlineStore:
        self._refresher = asyncio.create_task(self._refresh_loop(), name="redis-cluster-refresh")
        try:
            async with asyncio.timeout(max(1.0, 4 * self._write_timeout_s)):
                await self._client.initialize()
        except (TimeoutError, redis.exceptions.RedisError, redis.exceptions.RedisClusterException):
            # As with one Redis: down at start-up is an outage to report in answers.
            logger.warning("Redis Cluster not reachable yet; retrying in the background")
            self._refresh_wanted.set()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task, self._refresher = self._refresher, None
        await cancel_and_wait(task)
        await self._client.aclose()

    async def ping(self, timeout_s: float = 1.0) -> None:
        """Raise a ``DependencyError`` unless a node answers within ``timeout_s``."""
        await self._run([("PING",)], timeout_s)

    async def lookup(
        self,
        keys: Sequence[tuple[str, str]],
        timeout_s: float,
        previous_history_keys: Sequence[str] | None = None,
        grace_s: float = 0.0,
    ) -> list[StoreLookup]:
        """GET each answer and LRANGE each history: one pipeline to each node they live on, sent
        together, all within ``timeout_s`` (while rotating, each previous-token history too,
        used when the current one is empty). redis-py's cluster client runs under a plain
        ``asyncio.timeout``: ``grace_s`` is not used."""
        replies = await self._run(lookup_commands(keys, previous_history_keys), timeout_s)
        return lookups_from_replies(replies, len(keys), previous_history_keys is not None)

    async def write(self, writes: Sequence[StoreWrite]) -> None:
        """Write answers and append history entries (the single-node store's script, one call
        per transaction), loading the script on every master if one lacks it (a promoted
        replica may)."""
        adopt = await self._adoptions(writes)
        commands: list[tuple[Any, ...]] = []
        for w in writes:
            if w.history_key in adopt:  # before the entry: same node, so in order
                commands.append(adopt[w.history_key])
            if w.history_entry or w.cache_value:
                commands.append(self._write_command(w))
        if not commands:
            return
        replies = await self._run(commands, self._write_timeout_s, raise_first=False)
        failed = [r for r in replies if isinstance(r, Exception)]
        if failed and all(isinstance(r, redis.exceptions.NoScriptError) for r in failed):
            await self._run([("SCRIPT LOAD", WRITE_SCRIPT)], self._write_timeout_s)
            retry = [c for c, r in zip(commands, replies, strict=True) if isinstance(r, Exception)]
            replies = await self._run(retry, self._write_timeout_s, raise_first=False)
            failed = [r for r in replies if isinstance(r, Exception)]
        if failed:
            with translate_redis_errors():
                raise failed[0]

    async def _adoptions(self, writes: Sequence[StoreWrite]) -> dict[str, tuple[Any, ...]]:
        """For each write that moves a history from its previous token (while rotating), the
        command adopting that history's entries under the current token."""
        moving = [w for w in writes if w.previous_history_key and w.history_entry is not None]
        if not moving:
            return {}
        old = await self._run(
            [("LRANGE", w.previous_history_key, 0, HISTORY_LEN - 1) for w in moving],
            self._write_timeout_s,
        )
        return {
            w.history_key: ("EVAL", _ADOPT_SCRIPT, 1, w.history_key, self._feature_ttl_s, *entries)
            for w, entries in zip(moving, old, strict=True)
            if isinstance(entries, list) and entries
        }

    async def _run(
        self, commands: Sequence[tuple[Any, ...]], timeout_s: float, *, raise_first: bool = True
    ) -> list[Any]:
        """Send ``commands`` as one cluster pipeline; their replies (error replies raised, the
        first one, unless not ``raise_first``). Failures that may mean a changed topology ask
        for a slot-map refresh."""
        with translate_redis_errors():
            # The client initialises on the request path when a connection failure told it to:
            # that costs more than a budget (CLUSTER SLOTS, COMMAND), so leave it to the task.
            if self._client._initialize:
                self._refresh_wanted.set()
                raise redis.exceptions.ConnectionError("Redis Cluster slot map being refreshed")
            try:
                async with asyncio.timeout(timeout_s):
                    if len(commands) == 1 and commands[0][0] not in ("EVALSHA", "EVAL"):
                        return [await self._client.execute_command(*commands[0])]
                    pipe = self._client.pipeline()
                    for command in commands:
                        pipe.execute_command(*command)
                    replies: list[Any] = await pipe.execute(raise_on_error=False)
            except _TOPOLOGY_ERRORS:
                self._refresh_wanted.set()
                raise
            for reply in replies:
                if isinstance(reply, Exception):
                    if isinstance(reply, _TOPOLOGY_ERRORS):
                        self._refresh_wanted.set()
                    if raise_first:
                        raise reply
            return replies

    def _write_command(self, w: StoreWrite) -> tuple[Any, ...]:
        return write_command(
            w,
            script_sha=self._write_sha,
            cache_ttl_s=self._cache_ttl_s,
            feature_ttl_s=self._feature_ttl_s,
        )

    async def _refresh_loop(self) -> None:
        while True:
            await self._refresh_wanted.wait()
            self._refresh_wanted.clear()
            try:
                async with asyncio.timeout(max(1.0, 4 * self._write_timeout_s)):
                    if self._client._initialize:
                        await self._client.initialize()
                    else:
                        await self._client.nodes_manager.initialize()
                self.refreshes += 1
                logger.debug("Redis Cluster slot map refreshed")
            except (TimeoutError, OSError, redis.exceptions.RedisError) as exc:
                logger.debug("Redis Cluster slot-map refresh failed: %r", exc)
                self._refresh_wanted.set()
            except redis.exceptions.RedisClusterException as exc:
                logger.debug("Redis Cluster slot-map refresh failed: %r", exc)
                self._refresh_wanted.set()
            await asyncio.sleep(self._refresh_interval_s)
