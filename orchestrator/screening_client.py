"""Stage 1 client: feature rows to the screening workers over NATS request-reply.

The request goes to ``{prefix}.{model_version}``; the workers share a queue group, so NATS hands
each request to one of them. With nobody listening NATS answers "no responders" at once, which we
report as unavailable rather than waiting out the timeout. While the connection to NATS is down
(the client reconnects by itself, :mod:`cascade.nats_connection`) a request fails at once as
unavailable too: nats-py would buffer it until the reconnect, long after its caller gave up, and
then flood the workers with stale requests just when they are needed again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from opentelemetry import trace

from cascade import metrics
from cascade.errors import (
    Dependency,
    DependencyError,
    DependencyFailed,
    DependencyTimeout,
    DependencyUnavailable,
    translate_nats_errors,
)
from cascade.nats_connection import connect_nats
from cascade.screening_protocol import (
    encode_screening_request,
    members_subject,
    parse_heartbeat,
    parse_screening_reply,
    screening_subject,
    worker_subject,
)
from cascade.settings import HedgingSettings, NatsSettings
from cascade.telemetry import inject_headers, records_spans
from orchestrator.expiry import NATS_HANDOFFS, after_next_read, expire_later, timer_is_late
from orchestrator.screening_routing import HedgeBudget, LatencyQuantile, MemberTable
from orchestrator.stage_twin import ScoreFn, StageTwin

logger = logging.getLogger(__name__)

_STATUS: Final = "Status"  # the header NATS answers "no responders" (503) in
_NO_RESPONDERS: Final = "503"
_HEDGES_SENT: Final = metrics.SCREENING_HEDGES.labels("sent")
_HEDGES_WON: Final = metrics.SCREENING_HEDGES.labels("won")
_HEDGES_SKIPPED: Final = metrics.SCREENING_HEDGES.labels("skipped")
_HEDGES_OUTRUN: Final = metrics.SCREENING_HEDGES.labels("outrun")
_TIMER_TICK_S: Final = 0.001  # libuv's timer resolution


class Screener(Protocol):
    """Scores feature rows with the stage-1 model."""

    async def screen(
        self, rows: npt.NDArray[np.float32], timeout_s: float, grace_s: float = 0.0
    ) -> npt.NDArray[np.float32]:
        """One score per row; raise a ``DependencyError`` on failure or timeout.

        ``grace_s``: how much longer than ``timeout_s`` the call may wait when this process's
        own event loop was away past the timeout (:mod:`orchestrator.expiry`)."""
        ...


@dataclass(slots=True, eq=False)
class _Call:
    """One routed screening request in flight: one future, one or two copies sent.

    ``tokens[i]`` is the reply token of copy ``i`` and ``targets[i]`` the worker it went to (None:
    the queue group). Copy 1 is a hedge, or a resend after the first worker turned out gone.
    """

    future: asyncio.Future[Msg]
    sent_s: float
    payload: bytes
    headers: dict[str, str]
    tokens: list[str] = field(default_factory=list)
    targets: list[str | None] = field(default_factory=list)
    hedged: bool = False
    won_by_hedge: bool = False
    hedge_at_s: float = 0.0  # loop time the hedge timer is due
    hedge_after_s: float = 0.0  # the hedge delay, from sent_s (perf_counter)
    hedge_timer: asyncio.TimerHandle | None = None
    late_hedge_rechecked: bool = False  # the hedge timer fired late and was looked at again
    overtaken_token: str = ""  # the copy a winning hedge overtook: its worker is finished later


class NatsScreener:
    """:class:`Screener` over NATS; owns its connection (use as an async context manager).

    With ``hedging`` settings, requests go to live workers' own subjects and late ones are hedged
    (:mod:`orchestrator.screening_routing`); without, every request goes to the queue group.
    Routed replies come back on one inbox subscription of ours (``{inbox}.{token}``), so that a
    request and its hedge share one future.
    """

    def __init__(
        self,
        url: str,
        *,
        subject_prefix: str,
        model_version: str,
        feature_set: str,
        tracer: trace.Tracer,
        hedging: HedgingSettings | None = None,
        security: NatsSettings | None = None,
    ) -> None:
        self._url = url
        self._security = security
        self._subject = screening_subject(subject_prefix, model_version)
        self._model_version = model_version
        self._feature_set = feature_set
        self._tracer = tracer
        self._spans = records_spans(tracer)
        self._nc: NatsClient | None = None
        self._closed = False
        self._hedging = hedging
        self.members: MemberTable | None = None
        self._latency: LatencyQuantile | None = None
        self._budget: HedgeBudget | None = None
        if hedging is not None:
            self.members = MemberTable(
                ttl_s=hedging.member_ttl_s,
                heartbeat_s=hedging.heartbeat_s,
                routing=hedging.routing,
                pack_in_flight=hedging.pack_in_flight,
            )
            self._latency = LatencyQuantile(hedging.quantile)
            self._budget = HedgeBudget(hedging.ratio, hedging.burst)
        self._inbox = ""
        self._calls: dict[str, _Call] = {}
        # Reply token of a copy a hedge overtook -> its worker and the timer that suspects it
        # unless that copy's answer comes within the grace.
        self._overtaken: dict[str, tuple[str, asyncio.TimerHandle]] = {}
        self._next_token = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> NatsScreener:
        try:
            with translate_nats_errors():
                self._nc = nc = await connect_nats(
                    self._url, name="cascade-orchestrator", security=self._security
                )
                if self._hedging is not None:
                    self._inbox = nc.new_inbox() + "."
                    await nc.subscribe(self._inbox + "*", cb=self._on_reply)
                    await nc.subscribe(members_subject(self._subject), cb=self._on_heartbeat)
                    await nc.flush()
        except BaseException:
            await self.__aexit__(None, None, None)  # a start cut short leaves no connection open
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for _, timer in self._overtaken.values():
            timer.cancel()
        self._overtaken.clear()
        if self._nc is not None:
            await self._nc.close()
            self._nc = None
        self._closed = True

    async def screen(
        self, rows: npt.NDArray[np.float32], timeout_s: float, grace_s: float = 0.0
    ) -> npt.NDArray[np.float32]:
        """Request scores for ``rows`` from one worker (hedged to another when late)."""
        nc = self._nc
        if nc is None:
            raise RuntimeError("NatsScreener used outside its async with block")
        if not nc.is_connected:
            raise DependencyUnavailable(Dependency.SCREENING, "not connected to NATS")
        payload = encode_screening_request(rows, self._model_version, self._feature_set)
        headers: dict[str, str] = {}
        if not self._spans:
            inject_headers(headers)  # the call's (non-recording) context still propagates
            msg, _ = await self._request(nc, payload, timeout_s, grace_s, headers)
        else:
            with self._tracer.start_as_current_span(
                "stage1.screen",
                kind=trace.SpanKind.CLIENT,
                attributes={
                    "messaging.system": "nats",
                    "messaging.destination.name": self._subject,
                },
            ) as span:
                inject_headers(headers)
                msg, hedged = await self._request(nc, payload, timeout_s, grace_s, headers)
                span.set_attribute("cascade.stage1.hedge_won", hedged)
        try:
            reply = parse_screening_reply(msg.data)
        except ValueError as exc:
            raise DependencyFailed(Dependency.SCREENING, str(exc)) from exc
        if reply.error:
            raise DependencyFailed(Dependency.SCREENING, reply.error)
        if reply.scores.shape[0] != rows.shape[0]:
            raise DependencyFailed(
                Dependency.SCREENING, f"{reply.scores.shape[0]} scores for {rows.shape[0]} rows"
            )
        return reply.scores

    async def _request(
        self,
        nc: NatsClient,
        payload: bytes,
        timeout_s: float,
        grace_s: float,
        headers: dict[str, str],
    ) -> tuple[Msg, bool]:
        """The reply, and whether a hedge gave it."""
        if self._hedging is None:  # nats-py's own request and timeout: no grace
            with translate_nats_errors():
                msg = await nc.request(self._subject, payload, timeout=timeout_s, headers=headers)
            return msg, False
        return await self._routed_request(nc, payload, timeout_s, grace_s, headers)

    async def _routed_request(
        self,
        nc: NatsClient,
        payload: bytes,
        timeout_s: float,
        grace_s: float,
        headers: dict[str, str],
    ) -> tuple[Msg, bool]:
        members, latency, budget, hedging = self.members, self._latency, self._budget, self._hedging
        assert members is not None and latency is not None
        assert budget is not None and hedging is not None
        loop = asyncio.get_running_loop()
        call = _Call(loop.create_future(), time.perf_counter(), payload, headers)
        try:
            await self._send(nc, call, members.pick())
            budget.earn()
            known_s = latency.value_s
            hedge_s = (
                hedging.initial_delay_ms / 1000.0
                if known_s is None
                else max(hedging.min_delay_ms / 1000.0, known_s)
            )
            if timeout_s - hedge_s >= hedging.min_left_ms / 1000.0:
                call.hedge_at_s = loop.time() + hedge_s
                call.hedge_after_s = hedge_s
                call.hedge_timer = loop.call_later(hedge_s, self._hedge, nc, call)
            expiry = expire_later(
                call.future, timeout_s, TimeoutError, handoffs=NATS_HANDOFFS, grace_s=grace_s
            )
            try:
                msg = await call.future
            finally:
                expiry.cancel()
        except TimeoutError:
            for worker_id in call.targets:
                if worker_id is not None:
                    members.suspect(worker_id, f"no reply within {timeout_s * 1000:.1f} ms")
            raise DependencyTimeout(Dependency.SCREENING, "no reply in time") from None
        finally:
            if call.hedge_timer is not None:
                call.hedge_timer.cancel()
            for token in call.tokens:
                self._calls.pop(token, None)
            for token, worker_id in zip(call.tokens, call.targets, strict=True):
                # A copy a hedge overtook stays in flight at its worker until it answers or
                # its grace runs out (_on_reply, _overtaken_silent): packing passes it over.
                if worker_id is not None and token != call.overtaken_token:
                    members.finished(worker_id)
        latency.observe(time.perf_counter() - call.sent_s)
        return msg, call.won_by_hedge

    async def _send(self, nc: NatsClient, call: _Call, worker_id: str | None) -> None:
        self._next_token += 1
        token = str(self._next_token)
        call.tokens.append(token)
        call.targets.append(worker_id)
        if worker_id is not None and self.members is not None:
            self.members.sent(worker_id)  # finished in _routed_request, for every target
        self._calls[token] = call
        subject = self._subject if worker_id is None else worker_subject(self._subject, worker_id)
        with translate_nats_errors():
            await nc.publish(subject, call.payload, reply=self._inbox + token, headers=call.headers)

    def _hedge(self, nc: NatsClient, call: _Call) -> None:
        """The request is later than recent answers: send it to another worker too."""
        assert self._budget is not None and self.members is not None
        if call.future.done() or len(call.tokens) > 1:
            return
        loop = asyncio.get_running_loop()
        early_s = call.sent_s + call.hedge_after_s - time.perf_counter()
        if early_s > 0:
            # libuv counts timers in whole milliseconds from the start of a loop pass, so a
            # 1.3 ms timer can fire 0.5 ms after it was armed: before most answers, which then
            # spent the hedge budget on healthy requests (two thirds of them were hedged at
            # 100/s) and left none for a stalled worker. Wait out the rest, a tick at least.
            call.hedge_timer = loop.call_later(max(early_s, _TIMER_TICK_S), self._hedge, nc, call)
            return
        now_s = loop.time()
        if timer_is_late(call.hedge_at_s, now_s):
            if not call.late_hedge_rechecked:
                # The loop was away or behind: the answer may be waiting unread in our socket.
                # Look once more after the next read. Behind again by then, the loop is backed
                # up (overload): another request would only add work, and shedding handles
                # that. On time by then, it was a stall (the VM off its core), and the worker
                # still owes the answer: hedge, or a frozen worker costs the call its stage-1
                # cap (a default answer).
                call.late_hedge_rechecked = True
                call.hedge_at_s = now_s
                after_next_read(self._hedge, nc, call, handoffs=NATS_HANDOFFS)
                return
            _HEDGES_SKIPPED.inc()
            return
        if not self._budget.spend():
            _HEDGES_SKIPPED.inc()
            return
        call.hedged = True
        _HEDGES_SENT.inc()
        self._spawn(nc, call, self.members.pick_other(call.targets[0]))

    def _spawn(self, nc: NatsClient, call: _Call, worker_id: str | None) -> None:
        task = asyncio.ensure_future(self._send_second(nc, call, worker_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_second(self, nc: NatsClient, call: _Call, worker_id: str | None) -> None:
        if call.future.done():  # answered meanwhile: its wait has already finished its targets
            return
        try:
            await self._send(nc, call, worker_id)
        except DependencyError as exc:  # the first copy may still answer; its wait reports
            logger.debug("second screening request not sent: %s", exc)

    async def _on_reply(self, msg: Msg) -> None:
        token = msg.subject[len(self._inbox) :]
        overtaken = self._overtaken.pop(token, None)
        if overtaken is not None:  # the copy a hedge overtook
            overtaken_id, timer = overtaken
            timer.cancel()
            if self.members is not None:
                self.members.finished(overtaken_id, overtaken=True)
            if msg.headers and msg.headers.get(_STATUS) == _NO_RESPONDERS:
                if self.members is not None:
                    self.members.left(overtaken_id)  # its process is gone
            else:
                _HEDGES_OUTRUN.inc()  # it lost the race, but it answers: not stalled
            return
        call = self._calls.pop(token, None)
        if call is None or call.future.done():
            return
        copy = call.tokens.index(token)
        worker_id = call.targets[copy]
        if msg.headers and msg.headers.get(_STATUS) == _NO_RESPONDERS:
            if worker_id is not None and self.members is not None:
                self.members.left(worker_id)  # its process is gone (its subscription with it)
                if len(call.tokens) == 1 and self._nc is not None:
                    self._spawn(self._nc, call, None)  # resend to the queue group at once
                    return
            if not any(t in self._calls for t in call.tokens):  # no copy left to wait for
                call.future.set_exception(
                    DependencyUnavailable(Dependency.SCREENING, "no screening worker listening")
                )
            return
        if copy and call.hedged:
            call.won_by_hedge = True
            _HEDGES_WON.inc()
            first = call.targets[0]
            if first is not None:
                call.overtaken_token = call.tokens[0]
                self._watch_overtaken(call.tokens[0], first)
        call.future.set_result(msg)

    def _watch_overtaken(self, token: str, worker_id: str) -> None:
        """A hedge overtook the copy sent to ``worker_id``: suspect it unless that copy's answer
        comes within the grace. On a shared machine a worker that was off its core for a moment
        loses such races several times a second; routing around it then sent every request to
        the other worker for a heartbeat or two each time."""
        assert self._hedging is not None
        grace_s = self._hedging.overtaken_grace_ms / 1000.0
        timer = asyncio.get_running_loop().call_later(grace_s, self._overtaken_silent, token)
        self._overtaken[token] = (worker_id, timer)
        if self.members is not None:
            self.members.overtook(worker_id)

    def _overtaken_silent(self, token: str) -> None:
        entry = self._overtaken.pop(token, None)
        if entry is not None and self.members is not None:
            self.members.finished(entry[0], overtaken=True)
            grace_ms = self._hedging.overtaken_grace_ms if self._hedging is not None else 0.0
            self.members.suspect(
                entry[0], f"overtaken by a hedge, and no answer {grace_ms:g} ms later"
            )

    async def _on_heartbeat(self, msg: Msg) -> None:
        if self.members is None:
            return
        try:
            worker_id, leaving = parse_heartbeat(msg.data)
        except ValueError:
            logger.debug("ignoring a malformed screening heartbeat")
            return
        if leaving:
            self.members.left(worker_id)
        else:
            self.members.heard(worker_id)

    @property
    def connected(self) -> bool:
        """True while the connection to NATS is up (a reconnect may be under way otherwise)."""
        return self._nc is not None and self._nc.is_connected

    @property
    def closed(self) -> bool:
        """True once its NATS client finished closing (its socket and subscriptions' tasks
        gone); False before, and after a close that was interrupted."""
        return self._closed


class InMemoryScreener(StageTwin):
    """Twin of :class:`NatsScreener` for unit tests (see :class:`StageTwin`)."""

    def __init__(
        self, score_fn: ScoreFn, *, delay_s: float = 0.0, failure: Exception | None = None
    ) -> None:
        super().__init__(Dependency.SCREENING, score_fn, delay_s=delay_s, failure=failure)
        self.graces_s: list[float] = []

    async def screen(
        self, rows: npt.NDArray[np.float32], timeout_s: float, grace_s: float = 0.0
    ) -> npt.NDArray[np.float32]:
        """One score per row, as :meth:`NatsScreener.screen` (the grace is recorded, not needed:
        a twin's loop is never away)."""
        self.graces_s.append(grace_s)
        return await self.run(rows, timeout_s)
