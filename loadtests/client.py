"""The generator's I/O inside one process: gRPC channels, the open-loop send loop, the serial loop.

:class:`ScoringClient` owns ``channels`` grpc.aio channels to one loopback target (each its own
TCP connection) and sends pre-serialised ``ScoreRequest`` bytes round-robin over them. Where
several processes share the target's port (``cascade up --orchestrators N``), it keeps an equal
number of connections on each (:mod:`loadtests.connections`): the kernel gives a connection to
one of them by a hash, so one connection would load one process and leave the others idle.

:func:`run_open_loop` sends each request at its intended time whether or not earlier ones have
been answered (open loop), one owned task per call inside a ``TaskGroup``. Latency is counted
from the intended time, so when the generator or the server falls behind, the wait shows up in
the numbers instead of silently lowering the rate (coordinated omission). Sending stops once the
loop is more than ``deadline_s`` behind the end of its window (what is left is counted
``unsent``); calls still open ``deadline_s + grace_s`` after that are cancelled and counted as
timeouts. :func:`run_serial` is the closed loop with one call in flight, for the unloaded
latency.

Load runs with the collector quiet (:func:`quiet_collector`): the heap a step starts with (its
plan, the earlier tallies) is collected once and frozen before the step's start time is fixed
(a full collection of a large heap takes tens of milliseconds: taken after the start, it would
make the generator late from its first send). Without that, at a few thousand calls per second
the generator's own full collections took 30-46 ms each, every few seconds, and every answer
that arrived during one was counted late. :func:`run_serial` freezes by itself; callers of
:func:`run_open_loop` freeze around it (:mod:`loadtests.processes`).

Both loops take the sender as a plain async callable, so unit tests drive them with an in-memory
fake instead of a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from types import TracebackType
from typing import Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cascade.v1 import scoring_pb2
from loadtests.address import parse_loopback_target
from loadtests.connections import listeners, owners
from loadtests.replay import RequestPlan
from loadtests.results import Failure, Tally

__all__ = [
    "SCORE_BATCH_METHOD",
    "SCORE_METHOD",
    "Clock",
    "ScoringClient",
    "Sender",
    "Sleep",
    "classify_failure",
    "quiet_collector",
    "run_open_loop",
    "run_serial",
]

logger = logging.getLogger(__name__)

SCORE_METHOD: Final = "/cascade.v1.ScoringService/Score"
SCORE_BATCH_METHOD: Final = "/cascade.v1.ScoringService/ScoreBatch"
_GRACE_S: Final = 2.0
_SPREAD_ATTEMPTS_PER_CHANNEL: Final = 20

Sender = Callable[[bytes, float], Awaitable[scoring_pb2.ScoreResponse]]
"""``send(serialised ScoreRequest, timeout_s) -> ScoreResponse``; raises on failure."""

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


@contextlib.contextmanager
def quiet_collector() -> Iterator[None]:
    """Collect and freeze the heap for the block, so collections inside it scan only new objects.

    Measured in a one-process generator at ~3,000 calls/s: five full collections in a 10 s step,
    30-46 ms each, against none over 4 ms once frozen.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def classify_failure(exc: BaseException) -> tuple[Failure, str]:
    """How a failed call counts: gRPC DEADLINE_EXCEEDED and local timeouts are timeouts."""
    if isinstance(exc, grpc.aio.AioRpcError):
        code = exc.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return Failure.TIMEOUT, code.name
        return Failure.ERROR, code.name
    if isinstance(exc, TimeoutError):
        return Failure.TIMEOUT, "DEADLINE_EXCEEDED"
    return Failure.ERROR, type(exc).__name__


class ScoringClient:
    """``channels`` grpc.aio channels to a loopback target; an async context manager."""

    def __init__(self, target: str, *, channels: int = 1, connect_timeout_s: float = 10.0) -> None:
        if channels < 1:
            raise ValueError("channels must be >= 1")
        address = parse_loopback_target(target)
        self.target = address.grpc_target
        self._port = address.port
        self._n_channels = channels
        self._connect_timeout_s = connect_timeout_s
        self._channels: list[grpc.aio.Channel] = []
        self._callables: itertools.cycle[grpc.aio.UnaryUnaryMultiCallable] | None = None
        self.connections_by_process: dict[int, int] = {}
        """Where the target's port is shared by several processes: how many of this client's
        connections each holds (an equal share, at least ``channels`` in all)."""

    async def __aenter__(self) -> ScoringClient:
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                servers = await asyncio.to_thread(listeners, self._port)
                if len(servers) > 1:
                    await self._open_spread(servers)
                else:
                    for _ in range(self._n_channels):
                        self._channels.append(await self._open())
        except BaseException:
            await self._close()
            raise
        # request_serializer=None: the payloads are already serialised ScoreRequest bytes.
        self._callables = itertools.cycle(
            [
                ch.unary_unary(
                    SCORE_METHOD,
                    request_serializer=None,
                    response_deserializer=scoring_pb2.ScoreResponse.FromString,
                )
                for ch in self._channels
            ]
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    async def _open(self) -> grpc.aio.Channel:
        # A local subchannel pool gives every channel its own connection.
        channel = grpc.aio.insecure_channel(
            self.target, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        try:
            await channel.channel_ready()
        except BaseException:
            await channel.close()
            raise
        return channel

    async def _open_spread(self, servers: list[int]) -> None:
        """As many connections on each of ``servers`` (processes sharing the port), at least
        ``channels`` in all: a connection the kernel gave to a process that has its share
        already is closed and another one opened."""
        share = -(-self._n_channels // len(servers))
        held = dict.fromkeys(servers, 0)
        known = set(await asyncio.to_thread(owners, self._port, servers))
        attempts = _SPREAD_ATTEMPTS_PER_CHANNEL * share * len(servers)
        while min(held.values()) < share and attempts > 0:
            attempts -= 1
            channel = await self._open()
            now = await asyncio.to_thread(owners, self._port, servers)
            new = [client_port for client_port in now if client_port not in known]
            known = set(now)
            # Two new connections at once (another client connecting): whose is whose is
            # unknown, so this one goes too.
            pid = now[new[0]] if len(new) == 1 else None
            if pid is None or held[pid] >= share:
                await channel.close()
                continue
            held[pid] += 1
            self._channels.append(channel)
        if min(held.values()) < share:
            logger.warning(
                "connections spread unevenly over the processes on port %d: %s", self._port, held
            )
        self.connections_by_process = held

    async def _close(self) -> None:
        channels, self._channels = self._channels, []
        for channel in channels:
            await channel.close()

    async def health_check(self, timeout_s: float = 1.0) -> None:
        """One gRPC health ``Check`` (the cheapest call the server answers: the gRPC floor)."""
        if not self._channels:
            raise RuntimeError("ScoringClient used outside its async with block")
        stub = health_pb2_grpc.HealthStub(self._channels[0])
        await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)

    async def score_batch(
        self, request: scoring_pb2.ScoreBatchRequest, timeout_s: float
    ) -> scoring_pb2.ScoreBatchResponse:
        """One ``ScoreBatch`` call (backfilling history) on the first channel."""
        if not self._channels:
            raise RuntimeError("ScoringClient used outside its async with block")
        call = self._channels[0].unary_unary(
            SCORE_BATCH_METHOD,
            request_serializer=scoring_pb2.ScoreBatchRequest.SerializeToString,
            response_deserializer=scoring_pb2.ScoreBatchResponse.FromString,
        )
        reply: scoring_pb2.ScoreBatchResponse = await call(request, timeout=timeout_s)
        return reply

    async def send(self, payload: bytes, timeout_s: float) -> scoring_pb2.ScoreResponse:
        """One Score call with ``timeout_s`` as its gRPC deadline."""
        if self._callables is None:
            raise RuntimeError("ScoringClient used outside its async with block")
        reply: scoring_pb2.ScoreResponse = await next(self._callables)(payload, timeout=timeout_s)
        return reply


async def _call(
    send: Sender,
    payload: bytes,
    intended_s: float,
    start_at: float,
    deadline_s: float,
    tally: Tally,
    clock: Clock,
) -> None:
    sent_s = clock() - start_at
    tally.record_sent(intended_s, sent_s)
    try:
        reply = await send(payload, deadline_s)
    except asyncio.CancelledError:
        tally.record_failure(intended_s, clock() - start_at, Failure.TIMEOUT, "ABANDONED")
        raise
    except Exception as exc:  # every failure is data here, never a crash of the generator
        failure, code = classify_failure(exc)
        tally.record_failure(intended_s, clock() - start_at, failure, code)
        return
    tally.record_answer(intended_s, sent_s, clock() - start_at, reply, deadline_s)


async def run_open_loop(
    send: Sender,
    plan: RequestPlan,
    tally: Tally,
    *,
    start_at: float,
    window_s: float,
    deadline_s: float,
    clock: Clock = time.perf_counter,
    grace_s: float = _GRACE_S,
    sleep: Sleep = asyncio.sleep,
) -> None:
    """Send ``plan`` at its intended times (``start_at`` + offset on ``clock``) into ``tally``.

    ``sleep`` waits between sends; the processes that send real load pass a
    :class:`~loadtests.precise_timer.PreciseTimer`'s, since the loop's own timers tick in whole
    milliseconds.
    """
    offsets, payloads = plan.offsets_s, plan.payloads
    tally.scheduled += len(offsets)
    tally.repeats_planned += plan.repeats
    stop_sending_s = window_s + deadline_s
    try:
        async with asyncio.timeout_at(None) as hard_stop, asyncio.TaskGroup() as group:
            for i, offset in enumerate(offsets):
                now_s = clock() - start_at
                if now_s > stop_sending_s:
                    tally.unsent += len(offsets) - i
                    logger.warning(
                        "generator fell %.1f s behind; %d requests not sent",
                        now_s - offset,
                        len(offsets) - i,
                    )
                    break
                delay = offset - now_s
                # sleep(0) when late: still yield, so answers are read between sends.
                await sleep(delay if delay > 0 else 0)
                group.create_task(
                    _call(send, payloads[i], offset, start_at, deadline_s, tally, clock)
                )
            # Every call carries its own deadline; the hard stop only catches a stuck
            # transport.
            hard_stop.reschedule(asyncio.get_running_loop().time() + deadline_s + grace_s)
    except TimeoutError:
        logger.warning("calls still open %.1f s after the last send were abandoned", grace_s)


async def run_serial(
    send: Sender,
    payloads: Sequence[bytes],
    tally: Tally,
    *,
    duration_s: float,
    deadline_s: float,
    clock: Clock = time.perf_counter,
) -> None:
    """Closed loop, one call in flight: each request goes out when the previous one is done.

    Ends after ``payloads`` or ``duration_s``, whichever comes first.
    """
    with quiet_collector():
        start_at = clock()
        for payload in payloads:
            intended_s = clock() - start_at
            if intended_s >= duration_s:
                break
            tally.scheduled += 1
            await _call(send, payload, intended_s, start_at, deadline_s, tally, clock)
