"""The cascade's own exceptions, and the one place transport errors become them.

Tree::

    CascadeError
    ├── InvalidInputError            bad caller input; names the field      -> INVALID_ARGUMENT
    ├── ConfigurationError           bad settings or artifacts at start-up  -> FAILED_PRECONDITION
    │   ├── RegistryError            registry, policy or model file unusable (cascade.model_registry)
    │   └── SettingsInputError       a `cascade up --env-file`/`--set` value (devstack.stack_settings)
    ├── ServerError                  a local server process would not start (devstack.servers)
    ├── CallerError                  the caller may not make this call now (orchestrator.callers)
    │   ├── UnauthenticatedError     no credentials, or unknown ones        -> UNAUTHENTICATED
    │   ├── PermissionDeniedError    known caller, method not allowed to it -> PERMISSION_DENIED
    │   └── QuotaExceededError       past its rate or concurrency quota     -> RESOURCE_EXHAUSTED
    └── DependencyError              Redis, NATS/screening, Triton or JetStream (decision or
                                     outcome log) failed (``.dependency``)
        ├── DependencyTimeout        it did not answer within its budget    -> DEADLINE_EXCEEDED
        ├── DependencyUnavailable    refused, closed, no responders         -> UNAVAILABLE
        ├── DependencyOverloaded     it shed the request                    -> RESOURCE_EXHAUSTED
        └── DependencyFailed         it answered with an error              -> INTERNAL

Redis, NATS, JetStream (the decision log) and Triton errors are mapped to this tree only in the
``translate_*`` context managers below, and our errors map to gRPC status codes only in :func:`grpc_status_for`. The
orchestrator rarely lets a ``DependencyError`` reach the caller: it answers with a labelled
fallback instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import Final

import grpc
import nats.errors
import nats.js.errors
import redis.exceptions
from tritonclient.utils import InferenceServerException


class Dependency(StrEnum):
    """The downstream systems a request depends on."""

    REDIS = "redis"
    SCREENING = "screening"
    HEAVY = "heavy"
    DECISION_LOG = "decision_log"
    OUTCOME_LOG = "outcome_log"


class CascadeError(Exception):
    """Base of every error the cascade raises on purpose."""


class InvalidInputError(CascadeError):
    """The caller's input is unusable; ``field`` names the offending field path."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class ConfigurationError(CascadeError):
    """Settings or model artifacts are inconsistent; raised at start-up."""


class CallerError(CascadeError):
    """The caller may not make this call (now); ``identity`` names it where it is known."""

    def __init__(self, message: str, identity: str | None = None) -> None:
        super().__init__(message)
        self.identity = identity


class UnauthenticatedError(CallerError):
    """The call carries no usable credentials (none, or a token nobody holds)."""


class PermissionDeniedError(CallerError):
    """The caller is known, but may not call this method."""


class QuotaExceededError(CallerError):
    """The caller is past its rate or concurrency quota; ``retry_after_s`` says when a retry
    may pass."""

    def __init__(self, message: str, identity: str, retry_after_s: float) -> None:
        super().__init__(message, identity)
        self.retry_after_s = retry_after_s


class DependencyError(CascadeError):
    """A downstream dependency failed; ``dependency`` says which."""

    def __init__(self, dependency: Dependency, detail: str) -> None:
        super().__init__(f"{dependency.value}: {detail}")
        self.dependency = dependency
        self.detail = detail


class DependencyTimeout(DependencyError):
    """The dependency did not answer within the time it was given."""


class DependencyUnavailable(DependencyError):
    """The dependency could not be reached (refused, closed, nobody listening)."""


class DependencyOverloaded(DependencyError):
    """The dependency refused the work because it is saturated."""


class DependencyFailed(DependencyError):
    """The dependency answered, but with an error."""


def _redact(detail: str, limit: int = 200) -> str:
    # Transport messages can echo URLs; keep them short and drop anything after a userinfo '@'.
    detail = detail.splitlines()[0] if detail else ""
    if "@" in detail:
        detail = detail.split("@", 1)[1]
    return detail[:limit]


# Redis Cluster's ways of saying "this slot is not served right now" (a failover under way, a
# slot moving, no node known for it): the data is there again once the slot map is.
_REDIS_CLUSTER_UNAVAILABLE: Final[tuple[type[Exception], ...]] = (
    redis.exceptions.ClusterDownError,  # CLUSTERDOWN, MASTERDOWN
    redis.exceptions.TryAgainError,  # TRYAGAIN: a multi-key command during resharding
    redis.exceptions.AskError,  # MOVED/ASK the client did not follow (MovedError included)
    redis.exceptions.RedisClusterException,  # no node for the slot, cluster not reachable
)


@contextmanager
def translate_redis_errors() -> Iterator[None]:
    """Map redis-py errors raised inside the block to the cascade tree (its cluster client's
    included: a slot not served now is unavailable, not a failed command)."""
    try:
        yield
    except (TimeoutError, redis.exceptions.TimeoutError) as exc:
        raise DependencyTimeout(Dependency.REDIS, _redact(str(exc)) or "timed out") from exc
    except (redis.exceptions.ConnectionError, OSError) as exc:
        raise DependencyUnavailable(Dependency.REDIS, _redact(str(exc))) from exc
    except _REDIS_CLUSTER_UNAVAILABLE as exc:
        raise DependencyUnavailable(Dependency.REDIS, _redact(str(exc))) from exc
    except redis.exceptions.RedisError as exc:
        raise DependencyFailed(Dependency.REDIS, _redact(str(exc))) from exc


# nats-py's ways of saying "not connected right now" (a reconnect may fix it).
_NATS_NOT_CONNECTED: Final[tuple[type[Exception], ...]] = (
    nats.errors.ConnectionClosedError,
    nats.errors.NoServersError,
    nats.errors.ConnectionDrainingError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    OSError,
)
# Publishing faster than the connection drains fills nats-py's outbound buffer: the same.
_JETSTREAM_NOT_CONNECTED: Final[tuple[type[Exception], ...]] = (
    *_NATS_NOT_CONNECTED,
    nats.errors.OutboundBufferLimitError,
)


@contextmanager
def translate_nats_errors() -> Iterator[None]:
    """Map nats-py errors raised inside the block to the cascade tree."""
    try:
        yield
    except (TimeoutError, nats.errors.TimeoutError) as exc:
        raise DependencyTimeout(Dependency.SCREENING, "no reply in time") from exc
    except nats.errors.NoRespondersError as exc:
        raise DependencyUnavailable(Dependency.SCREENING, "no screening worker listening") from exc
    except _NATS_NOT_CONNECTED as exc:
        raise DependencyUnavailable(
            Dependency.SCREENING, _redact(str(exc)) or "not connected"
        ) from exc
    except nats.errors.MaxPayloadError as exc:
        raise DependencyFailed(Dependency.SCREENING, "request exceeds NATS max payload") from exc
    except nats.errors.Error as exc:
        raise DependencyFailed(Dependency.SCREENING, _redact(str(exc))) from exc


@contextmanager
def translate_jetstream_errors(
    dependency: Dependency = Dependency.DECISION_LOG,
) -> Iterator[None]:
    """Map nats-py's JetStream (and connection) errors raised inside the block to the cascade
    tree, as ``dependency`` (the decision log's by default, or the outcome log's): the stream
    API and publishing."""
    try:
        yield
    except (TimeoutError, nats.errors.TimeoutError) as exc:
        raise DependencyTimeout(dependency, "JetStream did not answer in time") from exc
    except (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError) as exc:
        raise DependencyUnavailable(
            dependency, "JetStream not enabled, or no stream for the subject"
        ) from exc
    except nats.js.errors.ServiceUnavailableError as exc:
        raise DependencyUnavailable(dependency, _redact(str(exc))) from exc
    except nats.js.errors.APIError as exc:
        raise DependencyFailed(dependency, _redact(str(exc))) from exc
    except _JETSTREAM_NOT_CONNECTED as exc:
        raise DependencyUnavailable(dependency, _redact(str(exc)) or "not connected") from exc
    except nats.errors.Error as exc:
        raise DependencyFailed(dependency, _redact(str(exc))) from exc


_TRITON_STATUS: dict[str, type[DependencyError]] = {
    "StatusCode.DEADLINE_EXCEEDED": DependencyTimeout,
    "StatusCode.UNAVAILABLE": DependencyUnavailable,
    "StatusCode.RESOURCE_EXHAUSTED": DependencyOverloaded,
    "StatusCode.CANCELLED": DependencyTimeout,
}


@contextmanager
def translate_triton_errors() -> Iterator[None]:
    """Map tritonclient errors raised inside the block to the cascade tree."""
    try:
        yield
    except TimeoutError as exc:
        raise DependencyTimeout(Dependency.HEAVY, "no answer in time") from exc
    except InferenceServerException as exc:
        kind = _TRITON_STATUS.get(str(exc.status()), DependencyFailed)
        message = exc.message() or ""
        if kind is DependencyFailed and "exceeds maximum queue size" in message:
            kind = DependencyOverloaded
        raise kind(Dependency.HEAVY, _redact(message) or str(exc.status())) from exc
    except OSError as exc:
        raise DependencyUnavailable(Dependency.HEAVY, _redact(str(exc))) from exc


_GRPC_STATUS: dict[type[CascadeError], grpc.StatusCode] = {
    InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    QuotaExceededError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ConfigurationError: grpc.StatusCode.FAILED_PRECONDITION,
    DependencyTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    DependencyUnavailable: grpc.StatusCode.UNAVAILABLE,
    DependencyOverloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DependencyFailed: grpc.StatusCode.INTERNAL,
}


def grpc_status_for(error: CascadeError) -> grpc.StatusCode:
    """The gRPC status code that reports ``error`` to a caller (INTERNAL when unmapped)."""
    for cls in type(error).__mro__:
        code = _GRPC_STATUS.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL
