"""A Locust file for the scoring service, for those who prefer Locust's UI and its user model.

Run (locust is not a dependency of this project; install it where you run it)::

    pip install locust
    CASCADE_TARGET=127.0.0.1:50051 locust -f loadtests/locustfile.py --headless \\
        --users 20 --spawn-rate 20 --run-time 30s

Each Locust user is a closed loop: it sends one ``Score`` call, waits for the answer, then waits
until ``1 / CASCADE_USER_RATE`` seconds have passed since the previous start
(``constant_throughput``). That is Locust's model and it suffers from coordinated omission: when
the server slows down, users send less, and the slow period is under-sampled. Use
``cascade loadtest`` (open loop, latency from the intended send time) for the numbers you report;
use this for exploration.

This follows Locust's documented pattern for gRPC: grpc is patched for gevent, a custom ``User``
holds a blocking channel, and every call fires ``events.request`` with its timing and outcome.

Environment: ``CASCADE_TARGET`` (loopback only, default 127.0.0.1:50051), ``CASCADE_USER_RATE``
(calls per second per user, default 10), ``CASCADE_REPEAT_SHARE`` (default 0.1),
``CASCADE_DEADLINE_MS`` (default 50), ``CASCADE_TX_SOURCE`` (simulator or samples).
"""

from __future__ import annotations

import functools
import os
import random
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, constant_throughput, events, task

from cascade.v1 import scoring_pb2
from cascade.wire import to_wire
from loadtests.address import parse_loopback_target
from loadtests.replay import ReplayStream, load_transactions

# Patch grpc so that its blocking calls yield to gevent instead of blocking every user.
grpc_gevent.init_gevent()

TARGET = parse_loopback_target(os.environ.get("CASCADE_TARGET", "127.0.0.1:50051")).grpc_target
USER_RATE = float(os.environ.get("CASCADE_USER_RATE", "10"))
REPEAT_SHARE = float(os.environ.get("CASCADE_REPEAT_SHARE", "0.1"))
DEADLINE_S = float(os.environ.get("CASCADE_DEADLINE_MS", "50")) / 1000.0
SOURCE = os.environ.get("CASCADE_TX_SOURCE", "simulator")


class _Requests:
    """Fresh transactions from one shared stream, and now and then an earlier one again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stream = ReplayStream(
            load_transactions(SOURCE, count=50_000, seed=7), nonce=secrets.token_hex(3)
        )
        self._sent: list[bytes] = []
        self._rng = random.Random(7)

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        with self._lock:
            if self._sent and self._rng.random() < REPEAT_SHARE:
                return self._rng.choice(self._sent)
            tx = self._stream.next()
            payload = scoring_pb2.ScoreRequest(transaction=to_wire(tx)).SerializeToString()
            self._sent.append(payload)
            return payload


@functools.cache
def _requests() -> _Requests:
    """The one request source every user of this process shares."""
    return _Requests()


@events.init.add_listener  # type: ignore[untyped-decorator,unused-ignore]
def _build_requests(environment: Any, **_kwargs: Any) -> None:
    """Simulate the transactions before any user starts (it takes a second or two)."""
    _requests()


class ScoringUser(User):  # type: ignore[misc,unused-ignore]  # locust is untyped where absent
    """One caller: a gRPC channel and a ``Score`` call at ``CASCADE_USER_RATE`` per second."""

    host = TARGET
    wait_time = constant_throughput(USER_RATE)

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self._channel = grpc.insecure_channel(TARGET)
        self._score = self._channel.unary_unary(
            "/cascade.v1.ScoringService/Score",
            request_serializer=None,
            response_deserializer=scoring_pb2.ScoreResponse.FromString,
        )

    def on_stop(self) -> None:
        """Close the channel when the user stops."""
        self._channel.close()

    @task  # type: ignore[untyped-decorator,unused-ignore]
    def score(self) -> None:
        """One Score call, reported to Locust with the path that answered it as its name."""
        payload = next(_requests())
        start = time.perf_counter()
        name, exception, length = "Score", None, 0
        try:
            reply: scoring_pb2.ScoreResponse = self._score(payload, timeout=DEADLINE_S)
            length = reply.ByteSize()
            name = "Score " + scoring_pb2.DecidedBy.Name(reply.decided_by).removeprefix(
                "DECIDED_BY_"
            )
            if reply.degraded:
                name += " (degraded)"
        except grpc.RpcError as exc:
            exception = exc
        events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length,
            exception=exception,
            context={},
        )
