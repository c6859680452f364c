"""A few dedicated Redis connections, each carrying many pipelines in flight at once.

Redis answers the commands of one connection in the order they were sent, so a connection does
not have to sit idle while a pipeline is out: every request is written at once and its replies
are matched to it by position. Requests made in the same pass of the event loop go out in one
write (one system call), on one connection, so concurrent lookups share a round trip without
waiting for company, and requests of one pass reach Redis in the order they were made;
each still gets its own replies, straight from the protocol callback, with no task in between. Two connections carry the orchestrator's whole load with no pool
to run out of (redis-py's pool had calls fail with ``MaxConnectionsError`` under load) and
without redis-py's per-call machinery (pipeline objects, pool checkout, a task hop per reply),
which was about a tenth of the orchestrator's CPU. Replies are parsed by hiredis in C.

:class:`PipelinedRedis` owns the connections; use it as an async context manager. A lost
connection fails the requests on it and is re-opened in the background by an owned task; while
none is open, requests fail at once rather than waiting out their timeouts. Errors leave this
module as ``OSError``, ``TimeoutError`` or :class:`RedisReplyError` (a redis-py
``ResponseError``), which :func:`cascade.errors.translate_redis_errors` maps to the cascade's
tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self, cast
from urllib.parse import unquote, urlsplit

import hiredis
import redis.exceptions

from cascade.settings import RedisSettings
from orchestrator.expiry import Expiry, expire_later

logger = logging.getLogger(__name__)

Arg = bytes | str | int
Reply = bytes | int | list["Reply"] | None | Exception

_RECONNECT_S: Final = 0.1


class RedisReplyError(redis.exceptions.ResponseError):
    """Redis answered a command with an error (``-ERR ...``, ``-NOSCRIPT ...``); a redis-py
    ``ResponseError``, so the one translation of Redis errors covers it."""


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """Where and how to connect, from a ``redis://`` or ``rediss://`` URL."""

    host: str
    port: int
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @classmethod
    def from_url(cls, url: str) -> RedisAddress:
        """Parse ``redis[s]://[[user]:password@]host[:port][/db]``; ValueError otherwise."""
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError("Redis URL must start with redis:// or rediss://")
        path = parts.path.lstrip("/")
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            db=int(path) if path else 0,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=parts.scheme == "rediss",
        )


def redis_connect_options(security: RedisSettings | None) -> dict[str, Any]:
    """:class:`PipelinedRedis` keyword arguments for ``security``'s ACL user, password and TLS
    files (none without it; the URL's scheme still decides whether TLS is spoken)."""
    if security is None:
        return {}
    options: dict[str, Any] = {}
    if security.username is not None:
        options["username"] = security.username
    if security.password is not None:
        options["password"] = security.password.get_secret_value()
    if security.tls_ca_file is not None or security.tls_cert_file is not None:
        context = ssl.create_default_context(
            cafile=str(security.tls_ca_file) if security.tls_ca_file else None
        )
        if security.tls_cert_file is not None and security.tls_key_file is not None:
            context.load_cert_chain(security.tls_cert_file, security.tls_key_file)
        options["tls"] = context
    return options


# hiredis's stub types the argument as a 1-tuple; it takes a tuple of any length.
_pack_command: Final = cast("Callable[[tuple[Arg, ...]], bytes]", hiredis.pack_command)


def encode_commands(commands: Sequence[Sequence[Arg]]) -> bytes:
    """RESP for ``commands`` (each a command name and its arguments), ready to write: hiredis
    encodes each command in C (3.3 against 5.7 us for a lookup's four commands in Python)."""
    pack = _pack_command
    return b"".join([pack(tuple(command)) for command in commands])


class _Connection(asyncio.Protocol):
    """One connection: requests go out as written, replies are handed back in order."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader(replyError=RedisReplyError)
        self._transport: asyncio.Transport | None = None
        # Requests of this loop pass, written together by _flush: payload, future, timeout, grace.
        self._outgoing: list[tuple[bytes, asyncio.Future[list[Reply]], float, float]] = []
        # Per request: how many replies it waits for, what it got so far, its future.
        self._waiting: deque[tuple[int, list[Reply], asyncio.Future[list[Reply]]]] = deque()
        self.closed = asyncio.get_running_loop().create_future()

    @property
    def pending(self) -> int:
        """Requests written and not yet answered."""
        return len(self._waiting)

    @property
    def writing(self) -> bool:
        """Requests of this loop pass are queued for one write."""
        return bool(self._outgoing)

    @property
    def is_open(self) -> bool:
        """Connected and not closing."""
        return self._transport is not None and not self._transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport does not subclass asyncio.Transport, though it implements it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        waiting = self._waiting
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:
                logger.warning("Redis protocol error: %s", exc)
                if self._transport is not None:
                    self._transport.close()
                return
            if reply is False:
                return
            if not waiting:
                logger.warning("Redis sent a reply nobody asked for; closing the connection")
                if self._transport is not None:
                    self._transport.close()
                return
            count, replies, future = waiting[0]
            replies.append(reply)
            if len(replies) == count:
                waiting.popleft()
                if not future.done():  # its caller may have timed out and gone
                    future.set_result(replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        while self._waiting:
            _, _, future = self._waiting.popleft()
            if not future.done():
                future.set_exception(ConnectionError("Redis connection lost"))
        if not self.closed.done():
            self.closed.set_result(None)

    def send(
        self, payload: bytes, count: int, timeout_s: float, grace_s: float = 0.0
    ) -> asyncio.Future[list[Reply]]:
        """Queue one request of ``count`` commands for this loop pass's write; its future gets
        their replies in order, or ``TimeoutError`` when they have not been received
        ``timeout_s`` after the write (plus up to ``grace_s`` if the timer fires late:
        :mod:`orchestrator.expiry`)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Reply]] = loop.create_future()
        if self._transport is None or self._transport.is_closing():
            future.set_exception(ConnectionError("Redis connection closed"))
            return future
        self._waiting.append((count, [], future))
        if not self._outgoing:
            loop.call_soon(self._flush)
        self._outgoing.append((payload, future, timeout_s, grace_s))
        return future

    def _flush(self) -> None:
        outgoing = self._outgoing
        self._outgoing = []
        if self._transport is None or self._transport.is_closing():
            return  # connection_lost fails the futures
        self._transport.write(b"".join(payload for payload, _, _, _ in outgoing))
        # The clocks start at the write: a busy event loop delaying it is not Redis's time.
        for _, future, timeout_s, grace_s in outgoing:
            expiry = expire_later(future, timeout_s, _no_reply, grace_s=grace_s)
            future.add_done_callback(functools.partial(_cancel_expiry, expiry))

    def close(self) -> None:
        """Close the transport (pending requests fail with ``ConnectionError``)."""
        if self._transport is not None:
            self._transport.close()


def _cancel_expiry(expiry: Expiry[list[Reply]], _: asyncio.Future[list[Reply]]) -> None:
    expiry.cancel()


def _no_reply() -> TimeoutError:
    return TimeoutError("no reply from Redis in time")


class PipelinedRedis:
    """``connections`` dedicated connections to one Redis; requests go to the least busy one."""

    def __init__(
        self,
        url: str,
        *,
        connections: int = 2,
        connect_timeout_s: float = 0.25,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``username``/``password`` replace the URL's (an ACL user); ``tls`` is the context of
        a ``rediss://`` URL's connections (default: the system's CAs)."""
        if connections < 1:
            raise ValueError("connections must be >= 1")
        address = RedisAddress.from_url(url)
        if username is not None or password is not None:
            address = dataclasses.replace(
                address,
                username=username if username is not None else address.username,
                password=password if password is not None else address.password,
            )
        self._address = address
        self._tls = tls
        self._size = connections
        self._connect_timeout_s = connect_timeout_s
        self._connections: list[_Connection] = []
        self._reconnecting: asyncio.Task[None] | None = None
        self._closing = False

    async def __aenter__(self) -> Self:
        try:
            await self._fill()
        except (OSError, TimeoutError, RedisReplyError) as exc:
            # Redis down at start-up is an outage to report in answers, not a reason not to run.
            logger.warning("Redis not reachable yet (%s); reconnecting in the background", exc)
            self._schedule_reconnect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing = True
        task, self._reconnecting = self._reconnecting, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for conn in self._connections:
            conn.close()
        await asyncio.gather(*(conn.closed for conn in self._connections))
        self._connections.clear()

    async def execute(
        self, commands: Sequence[Sequence[Arg]], timeout_s: float, grace_s: float = 0.0
    ) -> list[Reply]:
        """Send ``commands`` as one pipeline; their replies in order (error replies are
        :class:`RedisReplyError` values in the list). Raises ``TimeoutError`` when the replies
        have not arrived within ``timeout_s`` and ``ConnectionError`` when no connection is
        open.

        The timeout runs from the moment the request is written until its replies are
        received, not until this coroutine resumes: a busy event loop delaying either end is not
        Redis's slowness, so Redis's cap measures Redis. When the timer itself fires late,
        the wait goes on for up to ``grace_s`` more (:mod:`orchestrator.expiry`).
        """
        conn = self._connection_for_request()
        if conn is None:
            self._schedule_reconnect()
            raise ConnectionError("no Redis connection open")
        return await conn.send(encode_commands(commands), len(commands), timeout_s, grace_s)

    def _connection_for_request(self) -> _Connection | None:
        """The open connection whose write of this loop pass is already being built (so the
        request shares its system call, in order), else the one with the fewest requests out."""
        best: _Connection | None = None
        joining: _Connection | None = None
        open_count = 0
        for conn in self._connections:
            if conn.is_open:
                open_count += 1
                if joining is None and conn.writing:
                    joining = conn
                if best is None or conn.pending < best.pending:
                    best = conn
        if open_count < self._size:
            self._schedule_reconnect()
        return joining or best

    async def _open(self) -> _Connection:
        a = self._address
        loop = asyncio.get_running_loop()
        context = (self._tls or ssl.create_default_context()) if a.tls else None
        async with asyncio.timeout(self._connect_timeout_s):
            _, conn = await loop.create_connection(_Connection, a.host, a.port, ssl=context)
            hello: list[list[Arg]] = []
            if a.password is not None:
                hello.append(
                    ["AUTH", a.username, a.password] if a.username else ["AUTH", a.password]
                )
            if a.db:
                hello.append(["SELECT", a.db])
            if hello:
                replies = await conn.send(
                    encode_commands(hello), len(hello), self._connect_timeout_s
                )
                for reply in replies:
                    if isinstance(reply, Exception):
                        conn.close()
                        raise reply
        return conn

    async def _fill(self) -> None:
        self._connections = [c for c in self._connections if c.is_open]
        while len(self._connections) < self._size and not self._closing:
            self._connections.append(await self._open())

    def _schedule_reconnect(self) -> None:
        if self._closing or (self._reconnecting is not None and not self._reconnecting.done()):
            return
        self._reconnecting = asyncio.create_task(self._reconnect(), name="redis-reconnect")

    async def _reconnect(self) -> None:
        while not self._closing:
            try:
                await self._fill()
                return
            except (OSError, TimeoutError, RedisReplyError) as exc:
                logger.debug("Redis reconnect failed: %s", exc)
                await asyncio.sleep(_RECONNECT_S)
