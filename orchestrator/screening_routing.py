"""Where a screening request goes, and when it is hedged: pure bookkeeping, no I/O.

NATS queue groups keep handing requests to a member that is connected but stalled (a SIGSTOPped
or wedged process): with two workers, half the requests wait out their timeout, and nothing in
NATS notices. So the orchestrator routes for itself:

* every worker announces itself on ``{subject}.members`` every ``heartbeat_s`` and also listens
  on its own subject ``{subject}.w.{worker_id}``; :class:`MemberTable` keeps the workers heard
  from within ``member_ttl_s`` and picks one per request: in turn (``round_robin``, the
  default), or, with ``routing="pack"``, the first worker in this process's preference order
  that is not busy with our requests, so that at moderate rates one worker stays warm and the
  others are spares. On a VM whose idle cores halt,
  a worker that idles 7 ms between requests runs its model several times slower than one that
  idles 3 ms (``python -m loadtests.idle_penalty``). The order is rendezvous hashing of the worker
  ids with a per-process salt: orchestrator processes prefer different workers, and a worker
  that joins or leaves moves only its own share;
* a worker whose request was overtaken by a hedge (or timed out) is *suspect*: it gets no new
  requests until it is heard from again a heartbeat later, which a stalled process never is;
* a request still unanswered after the recent ``quantile`` of answer times (:class:`LatencyQuantile`)
  is sent once more to another live worker, and the first answer wins; :class:`HedgeBudget` (a
  token bucket) keeps hedges to a small share of requests when everything is slow, and no hedge
  is sent when its timer fires late (:func:`orchestrator.expiry.timer_is_late`): then the
  orchestrator's own event loop is the bottleneck, the answer may already wait unread, and
  admission control sheds.

With no member known (workers of an older release, or none heard yet) requests go to the queue
group as before.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from cascade import metrics

logger = logging.getLogger(__name__)

__all__ = ["HedgeBudget", "LatencyQuantile", "MemberTable"]

_LIVE: Final = metrics.SCREENING_MEMBERS.labels("live")
_SUSPECT: Final = metrics.SCREENING_MEMBERS.labels("suspect")


@dataclass(slots=True)
class _Member:
    last_heard_s: float
    weight: bytes  # its rank in this process's preference order (highest first)
    suspect_since_s: float | None = None
    in_flight: int = 0  # our requests sent to it and not yet finished
    overtaken: int = 0  # of those, copies a hedge overtook that have not answered yet


class MemberTable:
    """The screening workers heard from recently, and which of them to avoid."""

    def __init__(
        self,
        *,
        ttl_s: float,
        heartbeat_s: float,
        clock: Callable[[], float] = time.monotonic,
        routing: Literal["pack", "round_robin"] = "round_robin",
        pack_in_flight: int = 2,
        salt: bytes | None = None,
    ) -> None:
        self._ttl_s = ttl_s
        self._heartbeat_s = heartbeat_s
        self._clock = clock
        self._pack = routing == "pack"
        self._pack_in_flight = pack_in_flight
        self._salt = salt if salt is not None else random.randbytes(8)
        self._members: dict[str, _Member] = {}
        self._order: list[str] = []  # preference order when packing, join order otherwise
        self._next = 0

    def __len__(self) -> int:
        return len(self._members)

    def heard(self, worker_id: str) -> None:
        """A heartbeat from ``worker_id``: it is alive (and, a heartbeat after being suspected,
        answering again)."""
        now = self._clock()
        member = self._members.get(worker_id)
        if member is None:
            weight = hashlib.blake2b(worker_id.encode(), digest_size=8, key=self._salt).digest()
            self._members[worker_id] = _Member(now, weight)
            self._order.append(worker_id)
            if self._pack:
                self._order.sort(key=lambda w: self._members[w].weight, reverse=True)
            logger.info("screening worker %s joined", worker_id)
            self._publish()
            return
        member.last_heard_s = now
        if member.suspect_since_s is not None and now - member.suspect_since_s >= self._heartbeat_s:
            member.suspect_since_s = None
            logger.info("screening worker %s is answering again", worker_id)
            self._publish()

    def left(self, worker_id: str) -> None:
        """``worker_id`` said goodbye, or nobody listens on its subject any more."""
        if self._members.pop(worker_id, None) is not None:
            self._order.remove(worker_id)
            logger.info("screening worker %s left", worker_id)
            self._publish()

    def suspect(self, worker_id: str, why: str) -> None:
        """``worker_id`` did not answer in time: route around it until it is heard from again."""
        member = self._members.get(worker_id)
        if member is None or member.suspect_since_s is not None:
            return
        member.suspect_since_s = self._clock()
        metrics.SCREENING_MEMBER_SUSPECTED.inc()
        logger.warning(
            "screening worker %s stopped answering (%s); routing around it", worker_id, why
        )
        self._publish()

    def pick(self, exclude: str | None = None) -> str | None:
        """A live, unsuspected worker other than ``exclude``, or None: packing, the first in
        preference order with room (else the least busy); round robin, the next in turn."""
        if not self._order:
            return None
        now = self._clock()
        chosen, expired = (self._packed if self._pack else self._in_turn)(exclude, now)
        if expired:
            self._expire(now)
        return chosen

    @staticmethod
    def _routable(worker_id: str, member: _Member, exclude: str | None) -> bool:
        return member.suspect_since_s is None and worker_id != exclude

    def _packed(self, exclude: str | None, now: float) -> tuple[str | None, bool]:
        chosen: str | None = None
        has_room = expired = False
        for worker_id in self._order:  # all of them: a quiet one is noticed wherever it stands
            member = self._members[worker_id]
            if now - member.last_heard_s > self._ttl_s:
                expired = True
            elif has_room or not self._routable(worker_id, member, exclude):
                continue
            elif member.in_flight < self._pack_in_flight and not member.overtaken:
                chosen, has_room = worker_id, True
            elif chosen is None or member.in_flight < self._members[chosen].in_flight:
                chosen = worker_id
        return chosen, expired

    def _in_turn(self, exclude: str | None, now: float) -> tuple[str | None, bool]:
        n = len(self._order)
        expired = False
        for _ in range(n):
            self._next = (self._next + 1) % n
            worker_id = self._order[self._next]
            member = self._members[worker_id]
            if now - member.last_heard_s > self._ttl_s:
                expired = True
            elif self._routable(worker_id, member, exclude):
                return worker_id, expired
        return None, expired

    def sent(self, worker_id: str) -> None:
        """A request of ours went to ``worker_id``."""
        member = self._members.get(worker_id)
        if member is not None:
            member.in_flight += 1

    def in_flight(self, worker_id: str) -> int:
        """Our requests at ``worker_id`` not finished yet (0 for a worker not in the table)."""
        member = self._members.get(worker_id)
        return member.in_flight if member is not None else 0

    def overtook(self, worker_id: str) -> None:
        """A hedge overtook one of our requests in flight at ``worker_id``: until that copy
        answers, packing passes the worker over (it may be stalled; the grace decides)."""
        member = self._members.get(worker_id)
        if member is not None:
            member.overtaken += 1

    def finished(self, worker_id: str, *, overtaken: bool = False) -> None:
        """A request of ours that went to ``worker_id`` is over (answered, or given up;
        ``overtaken``: a copy :meth:`overtook` named, answered late or given up after its
        grace). Harmless for a worker that has left since."""
        member = self._members.get(worker_id)
        if member is None:
            return
        member.in_flight = max(0, member.in_flight - 1)
        if overtaken:
            member.overtaken = max(0, member.overtaken - 1)

    def pick_other(self, exclude: str | None) -> str | None:
        """Where a hedge of a request sent to ``exclude`` goes: a live, unsuspected other worker;
        failing that, a suspect one that still sends heartbeats (it may only have been slow once,
        whereas the queue group may hand the hedge straight back to ``exclude``); else None."""
        worker_id = self.pick(exclude)
        if worker_id is not None:
            return worker_id
        now = self._clock()
        for worker_id in self._order:
            if worker_id != exclude and now - self._members[worker_id].last_heard_s <= self._ttl_s:
                return worker_id
        return None

    def _expire(self, now: float) -> None:
        for worker_id in [
            w for w, m in self._members.items() if now - m.last_heard_s > self._ttl_s
        ]:
            del self._members[worker_id]
            self._order.remove(worker_id)
            logger.warning("screening worker %s went quiet (no heartbeat); dropped", worker_id)
        self._next = 0
        self._publish()

    def _publish(self) -> None:
        suspect = sum(m.suspect_since_s is not None for m in self._members.values())
        _SUSPECT.set(suspect)
        _LIVE.set(len(self._members) - suspect)


class LatencyQuantile:
    """A quantile of the last ``size`` observations, recomputed every ``every`` of them."""

    def __init__(self, quantile: float, *, size: int = 256, every: int = 32) -> None:
        self._quantile = quantile
        self._size = size
        self._every = every
        self._values: list[float] = []
        self._pos = 0
        self._since = 0
        self.value_s: float | None = None

    def observe(self, seconds: float) -> None:
        """Add one answer time."""
        values = self._values
        if len(values) < self._size:
            values.append(seconds)
        else:
            values[self._pos] = seconds
            self._pos = (self._pos + 1) % self._size
        self._since += 1
        if self._since >= self._every:
            self._since = 0
            ordered = sorted(values)
            self.value_s = ordered[min(len(ordered) - 1, int(self._quantile * len(ordered)))]


class HedgeBudget:
    """A token bucket: each request earns ``ratio`` of a hedge, up to ``burst`` hedges."""

    def __init__(self, ratio: float, burst: float) -> None:
        self._ratio = ratio
        self._burst = burst
        self.tokens = burst

    def earn(self) -> None:
        """One request was sent."""
        tokens = self.tokens + self._ratio
        self.tokens = tokens if tokens < self._burst else self._burst

    def spend(self) -> bool:
        """Take one hedge if one is left."""
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True
