"""One way to open a NATS connection that comes back quickly after the server does.

The orchestrator and the screening workers both connect through :func:`connect_nats`: reconnect
forever, a short wait between attempts (nats-py's default of 2 s kept a restarted NATS's answers
degraded for ~2 s after it was back), and one log line when the connection is lost and one when
it is back, instead of nats-py's default error callback, which prints a traceback to stderr for
every refused reconnect attempt. A server that refuses the client itself (a rejected login, a
certificate not trusted) is retried as well, so that fixing the settings or the server needs no
restart, but it is said at WARNING, once per 10 s, since retrying will not cure it.

The URL may name several servers, comma-separated (``nats://a:4222,nats://b:4222``): the
servers of one NATS cluster. The client connects to one of them, learns the others the cluster
announces, and when its server goes away reconnects to another at once (nats-py waits
``reconnect_time_wait`` only before trying a server it tried last).

Credentials and TLS come from :class:`~cascade.settings.NatsSettings` (``user``/``password``,
``tls_ca_file``, a client certificate), the same for every connection a process opens, the
decision and outcome logs' included: :func:`connect_options` turns them into nats-py's keyword
arguments. nats-py upgrades to TLS when the server asks for it (``tls_required`` in its INFO);
point ``nats.url`` at a server that does (``nats-server --tls``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any, Final

import nats.errors
from nats.aio.client import Client as NatsClient

from cascade.lifecycle import stop_task
from cascade.settings import NatsSettings, split_urls
from cascade.throttled_log import ThrottledLog

__all__ = ["RECONNECT_WAIT_S", "connect_nats", "connect_options"]

logger = logging.getLogger(__name__)

RECONNECT_WAIT_S: Final = 0.1
"""Between two reconnect attempts; a refused attempt on loopback costs next to nothing."""
_CLOSE_CUT_SHORT_S: Final = 1.0  # the most a cut-short connect's clean-up may take


def connect_options(security: NatsSettings | None) -> dict[str, Any]:
    """nats-py ``connect()`` keyword arguments for ``security``'s credentials and TLS (none
    without it): ``user``/``password``, and an SSL context trusting ``tls_ca_file`` (and
    presenting the client certificate) when a CA, a client certificate or a ``tls://`` URL is
    configured."""
    if security is None:
        return {}
    options: dict[str, Any] = {}
    if security.user is not None and security.password is not None:
        options["user"] = security.user
        options["password"] = security.password.get_secret_value()
    wants_tls = (
        security.tls_ca_file is not None
        or security.tls_cert_file is not None
        or security.tls_handshake_first
        or security.url.startswith("tls://")
    )
    if wants_tls:
        context = ssl.create_default_context(
            cafile=str(security.tls_ca_file) if security.tls_ca_file else None
        )
        if security.tls_cert_file is not None and security.tls_key_file is not None:
            context.load_cert_chain(security.tls_cert_file, security.tls_key_file)
        options["tls"] = context
        if security.tls_handshake_first:
            # Otherwise nats-py upgrades only when the server's INFO asks for TLS, and INFO
            # travels in the clear: whoever strips its tls_required gets the password.
            options["tls_handshake_first"] = True
    return options


async def connect_nats(
    url: str, *, name: str, security: NatsSettings | None = None, connect_timeout_s: int = 2
) -> NatsClient:
    """Connect to ``url`` (one server, or a cluster's servers comma-separated; raises nats-py's
    errors when the first connect fails) with ``security``'s credentials and TLS
    (:func:`connect_options`); afterwards the client reconnects on its own, to any server of
    the list, forever, every :data:`RECONNECT_WAIT_S`."""

    client = NatsClient()

    async def disconnected() -> None:
        if not client.is_closed:  # closing on purpose calls this too
            logger.warning("%s: NATS connection lost; reconnecting", name)

    async def reconnected() -> None:
        logger.warning("%s: NATS connection re-established", name)

    refused = ThrottledLog(logger)

    async def error(exc: Exception) -> None:
        # Refused reconnect attempts land here ten times a second while NATS is down.
        if _retrying_cannot_help(exc):
            refused.event("%s: NATS refuses this client (check its settings): %s", name, exc)
        else:
            logger.debug("%s: NATS client error: %r", name, exc)

    # The connect runs as a task of its own, and this waits on it with asyncio.wait, which a
    # timeout around the caller always interrupts. Cancelled inside nats-py, a connect can lose
    # the cancellation and go on retrying a refusing server forever (:func:`stop_task`).
    connecting = asyncio.create_task(
        client.connect(
            servers=split_urls(url),
            name=name,
            connect_timeout=connect_timeout_s,
            max_reconnect_attempts=-1,
            reconnect_time_wait=RECONNECT_WAIT_S,  # type: ignore[arg-type]  # typed int, used as float
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=error,
            **connect_options(security),
        ),
        name=f"{name}-nats-connect",
    )
    try:
        await asyncio.wait({connecting})
        connecting.result()
    except BaseException:
        try:
            await stop_task(connecting)
        finally:
            await _close_cut_short(client)
        raise
    return client


def _retrying_cannot_help(exc: Exception) -> bool:
    """Whether ``exc`` is a refusal that reconnecting forever will only repeat: a login the
    server rejects, a certificate the client does not trust. A server that is down is not."""
    if isinstance(exc, nats.errors.AuthorizationError | ssl.SSLCertVerificationError):
        return True
    return "authorization violation" in str(exc).lower()


async def _close_cut_short(client: NatsClient) -> None:
    """Close a client whose connect was cut short or failed.

    nats-py leaves such a connect with its socket and tasks alive. Its close can itself hang
    on a connection that never got through a TLS handshake (a test hung in CI on one refused
    for want of a client certificate), so it is bounded: whoever cut the connect short must get
    control back."""
    await stop_task(asyncio.create_task(client.close()), grace_s=_CLOSE_CUT_SHORT_S)
