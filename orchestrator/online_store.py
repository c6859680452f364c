"""The online store: output cache and card histories in Redis, read in one round trip.

Keys name every version an entry depends on, so a deploy never reads an entry written by the old
models and nothing needs flushing:

* output cache ``out:{policy}:{stage1}:{stage2}:{feature_set}:{{card token}}:{fingerprint}`` ->
  encoded answer
* card history ``hist2:{feature_set}:card:{{card token}}`` -> list of encoded entries (layout 2
  of :func:`cascade.features.encode_history_entry`), one per transaction id, ordered by
  ``(timestamp_ms, transaction_id)`` newest first, at most ``HISTORY_LEN``

No key or value holds a raw card or device id: the orchestrator hands this module transactions
whose ids are already tokens (:mod:`cascade.pseudonym`; the token names its key's version, as
the keys name model versions). While a key is rotated, a lookup also reads the card's history
under its previous token, used when the current one has none, and the post-answer write copies
it under the current token (``COPY``, a no-op once that key exists) before adding the entry:
histories move to the new key as cards transact, and the old keys expire with their TTL.

The card history's key names its storage layout as well as the feature set. Layout 1
(``feat:{feature_set}:card:...``: entries without a transaction id, in arrival order) cannot be
ordered or de-duplicated by the write script, so a deploy must not read it; the features computed
from a history did not change, so the feature-set version (which the models and their registry
name) stays, and the new prefix alone keeps the layouts apart. Layout-1 keys are never read
again; they expire with their TTL (``feature_ttl_s``).

The card token stands in braces (``{k1.3f2a...}``) in both keys: a Redis Cluster hashes only that part
(the key's hash tag), so a card's cached answers and its history live in one slot, on one node:
the lookup's GET and LRANGE and the write script's two keys never cross nodes. A single Redis
ignores the braces; the one naming serves both (``hist2:fs:card:card-42`` keys written before the
braces were added are no longer read, and expire with their TTL: a card's history starts again).

:class:`RedisOnlineStore` is the real backend; :class:`InMemoryOnlineStore` is its twin for unit
tests. Redis errors leave this module only as :mod:`cascade.errors` types.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Protocol, cast

from cascade.errors import Dependency, DependencyError, DependencyTimeout, translate_redis_errors
from cascade.features import (
    HISTORY_LEN,
    HistoryEntry,
    decode_history_entries,
    decode_history_entry,
    insert_entry,
)
from cascade.settings import RedisSettings
from cascade.transaction import Transaction
from orchestrator.redis_pipeline import Arg, PipelinedRedis, redis_connect_options
from orchestrator.results import ModelVersions

logger = logging.getLogger(__name__)


def transaction_fingerprint(tx: Transaction) -> str:
    """A stable 128-bit hex digest of every field the models read (and the transaction id)."""
    parts = (
        tx.transaction_id,
        tx.card_id,
        tx.merchant_id,
        tx.merchant_category,
        str(tx.amount_minor),
        tx.currency,
        tx.country,
        str(int(tx.channel)),
        str(tx.timestamp_ms),
        tx.device_id,
        tx.ip_country,
    )
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=16).hexdigest()


def output_cache_key(tx: Transaction, versions: ModelVersions) -> str:
    """Output-cache key naming policy, both model versions and the feature set; the card is
    its hash tag (the slot of :func:`card_history_key`)."""
    return (
        f"out:{versions.policy}:{versions.stage1}:{versions.stage2}:{versions.feature_set}:"
        f"{{{tx.card_id}}}:{transaction_fingerprint(tx)}"
    )


def card_history_key(card_id: str, feature_set: str) -> str:
    """Card-history key naming the storage layout and the feature-set version; the card is its
    hash tag (the slot of the card's :func:`output_cache_key` entries)."""
    return f"hist2:{feature_set}:card:{{{card_id}}}"


@dataclass(frozen=True, slots=True)
class StoreLookup:
    """What one lookup returns: the cached answer (if any) and the card's history, newest first,
    still encoded (decoding is the scorer's work, not counted against Redis's time)."""

    cached: bytes | None
    history: list[bytes]


@dataclass(frozen=True, slots=True)
class StoreWrite:
    """Post-answer writes for one transaction (either part may be absent)."""

    history_key: str
    history_entry: bytes | None
    cache_key: str | None = None
    cache_value: bytes | None = None
    previous_history_key: str = ""
    """While a pseudonym key is rotated: the card's history under its previous token, copied to
    ``history_key`` before the entry is added unless that key exists already."""


def decode_history(raw: Sequence[bytes]) -> list[HistoryEntry]:
    """Decode stored entries, skipping (and logging) any that cannot be read."""
    history, refused = decode_history_entries(raw)
    if refused:
        logger.warning("skipping %d unreadable card-history entries", refused)
    return history


class OnlineStore(Protocol):
    """Output cache + online features, one round trip to read, one batch to write."""

    async def lookup(
        self,
        keys: Sequence[tuple[str, str]],
        timeout_s: float,
        previous_history_keys: Sequence[str] | None = None,
        grace_s: float = 0.0,
    ) -> list[StoreLookup]:
        """For each ``(cache_key, history_key)``, the cached answer and the card history, in one
        round trip; raise a ``DependencyError`` on failure. With ``previous_history_keys`` (one
        per key pair, while a pseudonym key is rotated), an empty history is read under the
        previous key instead. ``grace_s``: how much longer than ``timeout_s`` it may wait when
        this process's own event loop was away past the timeout (:mod:`orchestrator.expiry`)."""
        ...

    async def write(self, writes: Sequence[StoreWrite]) -> None:
        """Apply post-answer writes; raise a ``DependencyError`` on failure."""
        ...


# One post-answer write as one command, atomic in Redis. The history entry joins the card's list
# by the rule of cascade.features.insert_entry: skipped when an entry with its transaction id is
# there; otherwise inserted before the first entry that sorts below it by (timestamp, id), newest
# first, and the list trimmed to HISTORY_LEN; the TTL is refreshed when it was added. The answer
# (when there is one) is stored either way. The script reads the entry layout of
# encode_history_entry: timestamp as big-endian int64 at bytes 2..9 (Lua counts from 1), the
# transaction id from byte 19 up to the first 0x1f. Ids are compared byte by byte, separator
# included (0x1f sorts below every id character, so a prefix sorts first, as in Python), not with
# Lua's `<` (strcoll: locale-dependent). Timestamp ties cost more (22 against 11 us of Redis time
# per write when every entry of a card has one timestamp). KEYS: history[, cache]; ARGV: entry,
# history length, history TTL[, answer, answer TTL]. Returns 1 when the entry was added, else 0.
# Both stores run it (orchestrator.cluster_store too: its two keys share the card's slot).
WRITE_SCRIPT: Final = """
local entry = ARGV[1]
local find, byte, unpack = string.find, string.byte, struct.unpack
local ts = unpack('>i8', entry, 2)
local id = string.sub(entry, 19, find(entry, '\\31', 19, true))
local n = #id
local id_bytes = {byte(id, 1, n)}
local items = redis.call('LRANGE', KEYS[1], 0, -1)
local function sorts_below(item)
  local item_ts = unpack('>i8', item, 2)
  if item_ts ~= ts then return item_ts < ts end
  for k = 1, n do
    local a, b = byte(item, 18 + k), id_bytes[k]
    if a ~= b then return a < b end
  end
  return false
end
local added = 0
local pivot = 0
for i = 1, #items do
  if find(items[i], id, 19, true) == 19 then
    pivot = -1
    break
  end
  if pivot == 0 and sorts_below(items[i]) then pivot = i end
end
local limit = tonumber(ARGV[2])
if pivot == 1 then
  redis.call('LPUSH', KEYS[1], entry)
  added = 1
elseif pivot > 1 then
  redis.call('LINSERT', KEYS[1], 'BEFORE', items[pivot], entry)
  added = 1
elseif pivot == 0 and #items < limit then
  redis.call('RPUSH', KEYS[1], entry)
  added = 1
end
if added == 1 then
  if #items >= limit then redis.call('LTRIM', KEYS[1], 0, limit - 1) end
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
if #KEYS > 1 then
  redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[5])
end
return added
"""


def lookup_commands(
    keys: Sequence[tuple[str, str]], previous_history_keys: Sequence[str] | None
) -> list[tuple[Arg, ...]]:
    """A lookup's commands, for either store: GET and LRANGE per ``(cache_key, history_key)``,
    then (while a pseudonym key is rotated) an LRANGE per previous-token history."""
    commands: list[tuple[Arg, ...]] = []
    for cache_key, history_key in keys:
        commands.append(("GET", cache_key))
        commands.append(("LRANGE", history_key, 0, HISTORY_LEN - 1))
    if previous_history_keys is not None:
        commands.extend(("LRANGE", k, 0, HISTORY_LEN - 1) for k in previous_history_keys)
    return commands


def lookups_from_replies(replies: Sequence[object], n: int, rotating: bool) -> list[StoreLookup]:
    """The :func:`lookup_commands` replies of ``n`` keys as lookups (an empty history read under
    the previous token while ``rotating``); an error reply is raised."""
    lookups: list[StoreLookup] = []
    for k in range(n):
        cached, history = replies[2 * k], replies[2 * k + 1]
        if not history and rotating:
            history = replies[2 * n + k]
        for reply in (cached, history):
            if isinstance(reply, Exception):
                raise reply
        lookups.append(
            StoreLookup(
                cached=cached if isinstance(cached, bytes) else None,
                history=cast("list[bytes]", history) if isinstance(history, list) else [],
            )
        )
    return lookups


def write_command(
    w: StoreWrite, *, script_sha: str, cache_ttl_s: int, feature_ttl_s: int
) -> tuple[Arg, ...]:
    """One transaction's post-answer write, for either store: SET of the answer alone, or the
    write script (``EVALSHA``) adding the history entry and, with an answer, caching it."""
    if w.history_entry is None:
        return ("SET", w.cache_key or "", w.cache_value or b"", "EX", cache_ttl_s)
    if w.cache_key is not None and w.cache_value is not None:
        return (
            "EVALSHA", script_sha, 2, w.history_key, w.cache_key, w.history_entry, HISTORY_LEN,
            feature_ttl_s, w.cache_value, cache_ttl_s,
        )  # fmt: skip
    return ("EVALSHA", script_sha, 1, w.history_key, w.history_entry, HISTORY_LEN, feature_ttl_s)


class RedisOnlineStore:
    """:class:`OnlineStore` on Redis: a few dedicated pipelined connections
    (:class:`~orchestrator.redis_pipeline.PipelinedRedis`), millisecond timeouts, no retries.
    """

    def __init__(
        self,
        url: str,
        *,
        cache_ttl_s: int,
        feature_ttl_s: int,
        connections: int = 2,
        connect_timeout_s: float = 0.25,
        write_timeout_s: float = 0.25,
        security: RedisSettings | None = None,
    ) -> None:
        """``security``'s ACL user, password and TLS files, where set, are used for ``url``."""
        self._redis = PipelinedRedis(
            url,
            connections=connections,
            connect_timeout_s=connect_timeout_s,
            **redis_connect_options(security),
        )
        self._cache_ttl_s = cache_ttl_s
        self._feature_ttl_s = feature_ttl_s
        self._write_timeout_s = write_timeout_s
        self._write_sha = hashlib.sha1(WRITE_SCRIPT.encode()).hexdigest()

    async def __aenter__(self) -> RedisOnlineStore:
        await self._redis.__aenter__()
        # Loaded now, the first writes need one round trip, not three (NOSCRIPT, load, retry).
        # A Redis that is not up yet gets it on first use.
        with contextlib.suppress(DependencyError):
            await self._load_script()
        return self

    async def _command(self, command: tuple[Arg, ...], timeout_s: float) -> None:
        """Run one command; raise a ``DependencyError`` on failure or an error reply."""
        with translate_redis_errors():
            (reply,) = await self._redis.execute([command], timeout_s)
            if isinstance(reply, Exception):
                raise reply

    async def _load_script(self) -> None:
        await self._command(("SCRIPT", "LOAD", WRITE_SCRIPT), self._write_timeout_s)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._redis.__aexit__(exc_type, exc, tb)

    async def ping(self, timeout_s: float = 1.0) -> None:
        """Raise a ``DependencyError`` unless Redis answers within ``timeout_s``."""
        await self._command(("PING",), timeout_s)

    async def lookup(
        self,
        keys: Sequence[tuple[str, str]],
        timeout_s: float,
        previous_history_keys: Sequence[str] | None = None,
        grace_s: float = 0.0,
    ) -> list[StoreLookup]:
        """GET each answer and LRANGE each history in one pipelined round trip (and, while
        rotating, each previous-key history too, in the same round trip)."""
        commands = lookup_commands(keys, previous_history_keys)
        with translate_redis_errors():
            replies = await self._redis.execute(commands, timeout_s, grace_s)
            return lookups_from_replies(replies, len(keys), previous_history_keys is not None)

    async def write(self, writes: Sequence[StoreWrite]) -> None:
        """Write answers and append history entries for many transactions in one round trip,
        one script call per transaction (loading the script again if Redis lost it)."""
        if not writes:
            return
        commands: list[tuple[Arg, ...]] = []
        for w in writes:
            if w.previous_history_key and w.history_entry is not None:
                # Before the entry is added, so the current key then holds the whole history.
                commands.append(("COPY", w.previous_history_key, w.history_key))
            if w.history_entry or w.cache_value:
                commands.append(self._write_command(w))
        if not commands:
            return
        with translate_redis_errors():
            replies = await self._redis.execute(commands, self._write_timeout_s)
            failed = [r for r in replies if isinstance(r, Exception)]
            if failed and all(str(r).startswith("NOSCRIPT") for r in failed):
                await self._load_script()
                # Only the script calls failed: the script was missing for every one of them.
                retry = [
                    c for c, r in zip(commands, replies, strict=True) if isinstance(r, Exception)
                ]
                replies = await self._redis.execute(retry, self._write_timeout_s)
                failed = [r for r in replies if isinstance(r, Exception)]
            if failed:
                raise failed[0]

    def _write_command(self, w: StoreWrite) -> tuple[Arg, ...]:
        return write_command(
            w,
            script_sha=self._write_sha,
            cache_ttl_s=self._cache_ttl_s,
            feature_ttl_s=self._feature_ttl_s,
        )


class InMemoryOnlineStore:
    """Dictionary twin of :class:`RedisOnlineStore` for unit tests (no TTLs)."""

    def __init__(self) -> None:
        self.cache: dict[str, bytes] = {}
        self.histories: dict[str, list[bytes]] = {}
        self.failure: Exception | None = None
        self.delay_s = 0.0
        self.lookups = 0
        self.graces_s: list[float] = []  # the grace each lookup was given (a twin needs none)

    async def lookup(
        self,
        keys: Sequence[tuple[str, str]],
        timeout_s: float,
        previous_history_keys: Sequence[str] | None = None,
        grace_s: float = 0.0,
    ) -> list[StoreLookup]:
        """Return what :meth:`write` stored; raise ``failure`` when one is set, or time out when
        ``delay_s`` exceeds the timeout (as a slow Redis would)."""
        self.lookups += 1
        self.graces_s.append(grace_s)
        if self.failure is not None:
            raise self.failure
        if self.delay_s > timeout_s:
            await asyncio.sleep(timeout_s)
            raise DependencyTimeout(Dependency.REDIS, "timed out")
        await asyncio.sleep(self.delay_s)
        previous = previous_history_keys or [""] * len(keys)
        return [
            StoreLookup(
                cached=self.cache.get(cache_key),
                history=(self.histories.get(history_key) or self.histories.get(previous_key) or [])[
                    :HISTORY_LEN
                ],
            )
            for (cache_key, history_key), previous_key in zip(keys, previous, strict=True)
        ]

    async def write(self, writes: Sequence[StoreWrite]) -> None:
        """Store answers and add history entries by the real store's rule
        (:func:`~cascade.features.insert_entry`: once per transaction id, ordered by timestamp,
        the ``HISTORY_LEN`` newest kept)."""
        if self.failure is not None:
            raise self.failure
        for w in writes:
            if w.cache_key is not None and w.cache_value is not None:
                self.cache[w.cache_key] = w.cache_value
            if w.history_entry is not None:
                if w.previous_history_key and w.history_key not in self.histories:
                    copied = self.histories.get(w.previous_history_key)
                    if copied is not None:
                        self.histories[w.history_key] = list(copied)
                raw = self.histories.setdefault(w.history_key, [])
                entries = [decode_history_entry(b) for b in raw]
                entry = decode_history_entry(w.history_entry)
                if insert_entry(entries, entry):
                    raw.insert(entries.index(entry), w.history_entry)
                    del raw[HISTORY_LEN:]
