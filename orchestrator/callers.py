"""Who is calling, whether they may, and whether they are within their quota.

A caller is named by its client certificate (mutual TLS: the common name, else the first subject
alternative name) or by a bearer token in the call's metadata (``authorization: Bearer <token>``),
whose SHA-256 is listed under its name in the settings (``auth.callers`` or ``auth.callers_file``;
tokens themselves are never stored). A token, when sent, wins over the certificate (a gateway
with one certificate may speak for several callers) and must be known. Without either the call is
anonymous, which ``auth.required`` refuses.

:class:`CallerGuard.admit` does all of it once per call, before any scoring: it raises
:class:`~cascade.errors.UnauthenticatedError`, :class:`~cascade.errors.PermissionDeniedError` or
:class:`~cascade.errors.QuotaExceededError`, or returns the caller's quota, to be released when
the call ends. The server installs the guard only when authentication or quotas are configured,
so without them calls pay nothing. Health and reflection are other services: never guarded.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from cascade.errors import PermissionDeniedError, UnauthenticatedError
from cascade.settings import CallerLimits, Settings
from orchestrator.quota import CallerQuota, Clock

__all__ = [
    "ANONYMOUS",
    "CallContext",
    "CallerGuard",
    "bearer_token",
    "certificate_identity",
    "guard_needed",
    "token_digest",
]

ANONYMOUS: Final = "anonymous"
"""The identity of calls without credentials (one quota for all of them)."""

_AUTHORIZATION: Final = "authorization"
_BEARER: Final = "bearer "
_CN: Final = "x509_common_name"
_SAN: Final = "x509_subject_alternative_name"


class CallContext(Protocol):
    """What the guard reads of a call (``grpc.aio.ServicerContext`` has both)."""

    def invocation_metadata(self) -> Sequence[tuple[str, str | bytes]] | None: ...

    def auth_context(self) -> Mapping[str, Iterable[bytes]]: ...


def token_digest(token: str) -> str:
    """The hex SHA-256 of ``token``: what the settings list (``token_sha256``)."""
    return hashlib.sha256(token.encode()).hexdigest()


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry, or None without one.

    Raises:
        UnauthenticatedError: an ``authorization`` entry that is not a bearer token.
    """
    for key, value in metadata or ():
        if key != _AUTHORIZATION:
            continue
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        if text[: len(_BEARER)].lower() != _BEARER or not text[len(_BEARER) :].strip():
            raise UnauthenticatedError("authorization metadata must be 'Bearer <token>'")
        return text[len(_BEARER) :].strip()
    return None


def certificate_identity(auth_context: Mapping[str, Iterable[bytes]]) -> str | None:
    """The verified client certificate's common name, else its first subject alternative
    name; None when the connection carries no client certificate."""
    for key in (_CN, _SAN):
        for value in auth_context.get(key, ()):
            name = value.decode(errors="replace").strip()
            if name:
                return name
    return None


def guard_needed(settings: Settings) -> bool:
    """Whether calls must pass a :class:`CallerGuard`: authentication asked for, a client CA
    (callers named by certificates), any named caller, or a default with limits."""
    auth = settings.auth
    default = auth.default
    return (
        auth.required
        or settings.server.tls.client_ca_file is not None
        or bool(auth.all_callers())
        or default.limited
        or set(default.methods) != set(CallerLimits().methods)
    )


@dataclass(frozen=True, slots=True)
class _Caller:
    identity: str
    methods: frozenset[str]
    quota: CallerQuota | None


def _caller(identity: str, limits: CallerLimits, clock: Clock) -> _Caller:
    quota = CallerQuota(identity, limits, clock) if limits.limited else None
    return _Caller(identity, frozenset(limits.methods), quota)


class CallerGuard:
    """Authenticates, authorizes and meters the calls of ``ScoringService``."""

    def __init__(self, settings: Settings, *, clock: Clock = time.monotonic) -> None:
        auth = settings.auth
        self._clock = clock
        self._default = auth.default
        self._mutual_tls = settings.server.tls.client_ca_file is not None
        callers = auth.all_callers()
        self._named = {name: _caller(name, limits, clock) for name, limits in callers.items()}
        self._tokens: list[tuple[str, str]] = [
            (digest, name) for name, c in callers.items() for digest in c.token_sha256
        ]
        # Certificate names the settings do not list: each gets the default limits on its own
        # (they are as many as the client CA signed, not as many as callers invent).
        self._unlisted: dict[str, _Caller] = {}
        self._anonymous = None if auth.required else _caller(ANONYMOUS, auth.default, clock)

    def identify(self, context: CallContext) -> str:
        """The caller's identity (:data:`ANONYMOUS` without credentials, when allowed).

        Raises:
            UnauthenticatedError: an unknown or malformed token, or no credentials where they
                are required.
        """
        return self._caller(context).identity

    def _caller(self, context: CallContext) -> _Caller:
        token = bearer_token(context.invocation_metadata())
        if token is not None:
            digest = token_digest(token)
            found: str | None = None
            # Every digest compared, in constant time each: how long this takes says nothing
            # about which one (if any) matched.
            for known, name in self._tokens:
                if hmac.compare_digest(digest, known) and found is None:
                    found = name
            if found is None:
                raise UnauthenticatedError("unknown bearer token")
            return self._named[found]
        if self._mutual_tls:
            subject = certificate_identity(context.auth_context())
            if subject is not None:
                caller = self._named.get(subject) or self._unlisted.get(subject)
                if caller is None:
                    caller = self._unlisted[subject] = _caller(subject, self._default, self._clock)
                return caller
        if self._anonymous is None:
            raise UnauthenticatedError("this service needs a client certificate or a bearer token")
        return self._anonymous

    def admit(self, method: str, context: CallContext) -> CallerQuota | None:
        """Let the call of ``method`` (``Score``, ``ScoreBatch``, ``ReportOutcome``) through,
        or raise; the quota returned (None: unlimited) must be released when the call ends.

        Raises:
            UnauthenticatedError: see :meth:`identify`.
            PermissionDeniedError: the caller may not call ``method``.
            QuotaExceededError: the caller is past its rate or concurrency quota.
        """
        caller = self._caller(context)
        if method not in caller.methods:
            raise PermissionDeniedError(
                f"caller {caller.identity!r} may not call {method}", caller.identity
            )
        if caller.quota is not None:
            caller.quota.acquire()
        return caller.quota
