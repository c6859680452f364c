"""Real server processes on loopback: Redis, NATS and Triton, for ``cascade up`` and the tests
(and a NATS cluster and a Redis Cluster of such processes, :mod:`devstack.servers.clusters`).

Each server is an async context manager: entering starts the process in its own process group
(output to a log file in ``log_dir``) and returns once the server really answers; leaving stops it
(SIGTERM, SIGKILL after a grace period) and reaps it, also when the body raised or was cancelled.
Port 0 means "pick a free port". Start failures raise ``ServerStartError`` quoting the log tail.
"""

from __future__ import annotations

from devstack.servers._errors import ServerBinaryNotFoundError, ServerError, ServerStartError
from devstack.servers._process import (
    LOOPBACK,
    ManagedProcess,
    ReadinessProbe,
    free_port,
    port_is_free,
    resolve_port,
)
from devstack.servers._security import Credentials, ServerTls
from devstack.servers.clusters import NatsCluster, RedisClusterServers
from devstack.servers.nats import NatsServer
from devstack.servers.redis import RedisServer
from devstack.servers.triton import TritonServer

__all__ = [
    "LOOPBACK",
    "Credentials",
    "ManagedProcess",
    "NatsCluster",
    "NatsServer",
    "ReadinessProbe",
    "RedisClusterServers",
    "RedisServer",
    "ServerBinaryNotFoundError",
    "ServerError",
    "ServerStartError",
    "ServerTls",
    "TritonServer",
    "free_port",
    "port_is_free",
    "resolve_port",
]
