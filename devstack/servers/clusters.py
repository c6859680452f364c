"""Clusters on loopback: three ``nats-server`` nodes with routes and JetStream, and a Redis
Cluster of three masters with a replica each.

Both are async context managers that start every node, wait until the cluster works (JetStream
answers through any node; every Redis slot is served and every replica follows its master) and
stop every node however the block ends. :meth:`NatsCluster.kill` and
:meth:`RedisClusterServers.kill` SIGKILL one node (a crash, for failure tests); ``restart``
starts it again on its ports with its data.

The Redis Cluster is formed with plain commands (``CLUSTER MEET``, ``ADDSLOTS``,
``REPLICATE``) rather than ``redis-cli --cluster create``, so its layout is known: master ``i``
holds the ``i``-th third of the slots and node ``3 + i`` is its replica. Its nodes time a peer
out after ``node_timeout_ms`` (a replica takes over a killed master about 1-2 s after that) and
keep serving their own slots while another master's are not (``cluster-require-full-coverage
no``), which a latency-bound store wants.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import nats
import redis.asyncio as aioredis

from devstack.servers._errors import ServerStartError
from devstack.servers._process import LOOPBACK, StartStop, free_port, free_port_pair
from devstack.servers.nats import NatsServer
from devstack.servers.redis import RedisServer

logger = logging.getLogger(__name__)

_SLOTS: Final = 16384
_POLL_S: Final = 0.1
_BUS_OFFSET: Final = 10_000


def _text(reply: bytes | str) -> str:
    return reply.decode() if isinstance(reply, bytes) else reply


async def _cluster_info(client: aioredis.Redis) -> dict[str, str]:
    reply = await client.execute_command("CLUSTER INFO")  # type: ignore[no-untyped-call]
    if isinstance(reply, dict):
        return {str(k): _text(v) if isinstance(v, bytes) else str(v) for k, v in reply.items()}
    lines = _text(reply).splitlines()
    return dict(line.split(":", 1) for line in lines if ":" in line)


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=2.0) as response:
        data: dict[str, Any] = json.load(response)
        return data


def _kill(pid: int | None) -> None:
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


class NatsCluster(StartStop):
    """``nodes`` nats-servers on 127.0.0.1, each routed to every other, JetStream on each (its
    store in a folder of its own). ``url`` lists every node, comma-separated, as the cascade's
    ``CASCADE_NATS__URL`` takes it."""

    def __init__(
        self,
        nodes: int = 3,
        *,
        log_dir: Path | None = None,
        store_dir: Path | None = None,
        name: str = "cascade",
        ready_timeout_s: float = 30.0,
    ) -> None:
        if nodes < 1:
            raise ValueError("a cluster needs at least one node")
        cluster_ports = [free_port() for _ in range(nodes)]
        self._own_store = store_dir is None
        self.store_dir: Final = store_dir or Path(tempfile.mkdtemp(prefix="cascade-nats-cluster-"))
        self._ready_timeout_s = ready_timeout_s
        self.nodes: Final = [
            NatsServer(
                jetstream=True,
                store_dir=self.store_dir / f"n{i}",
                log_dir=log_dir,
                server_name=f"{name}-n{i}",
                cluster_name=name,
                cluster_port=cluster_ports[i],
                routes=[p for j, p in enumerate(cluster_ports) if j != i],
                # Monitoring shows each node's routes (start waits for a full mesh) and clients.
                monitor_port=0,
            )
            for i in range(nodes)
        ]

    @property
    def url(self) -> str:
        """Every node's ``nats://`` URL, comma-separated."""
        return ",".join(node.url for node in self.nodes)

    async def start(self) -> None:
        """Start every node, then wait until each is routed to every other and JetStream answers
        (its meta leader is elected)."""
        try:
            await asyncio.gather(*(node.start() for node in self.nodes))
            await self._wait_routes()
            await self._wait_jetstream()
        except BaseException:
            await self.stop()
            raise

    async def routed_peers(self, index: int) -> int:
        """How many other nodes node ``index`` has a route to now (from its ``/routez``)."""
        node = self.nodes[index]
        routez = await asyncio.to_thread(_get_json, f"{node.monitor_url}/routez")
        # Since 2.10 a peer gets a pool of several route connections: count peers, not routes.
        return len({r.get("remote_id") for r in routez.get("routes") or []})

    async def _wait_routes(self) -> None:
        deadline = time.monotonic() + self._ready_timeout_s
        while True:
            counts = [await self.routed_peers(i) for i in range(len(self.nodes))]
            if all(n >= len(self.nodes) - 1 for n in counts):
                return
            if time.monotonic() >= deadline:
                raise ServerStartError(f"NATS cluster: routes not meshed in time ({counts})")
            await asyncio.sleep(_POLL_S)

    async def _wait_jetstream(self) -> None:
        deadline = time.monotonic() + self._ready_timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                nc = await nats.connect(servers=[n.url for n in self.nodes], connect_timeout=1)
            except Exception as exc:  # not yet: the nodes may still be routing
                last = exc
            else:
                try:
                    await nc.jetstream().account_info()
                    return
                except Exception as exc:  # no meta leader yet
                    last = exc
                finally:
                    await nc.close()
            await asyncio.sleep(_POLL_S)
        raise ServerStartError(f"NATS cluster: JetStream not ready in time ({last!r})")

    async def nodes_with_client(self, client_name: str) -> list[int]:
        """Indexes of the live nodes a client named ``client_name`` is connected to now (from
        each node's ``/connz``)."""
        found = []
        for i, node in enumerate(self.nodes):
            if not node.process.running:
                continue
            connz = await asyncio.to_thread(_get_json, f"{node.monitor_url}/connz?limit=1024")
            if any(c.get("name") == client_name for c in connz.get("connections") or []):
                found.append(i)
        return found

    async def kill(self, index: int) -> None:
        """SIGKILL node ``index`` (no goodbye to its clients or routes) and reap it."""
        node = self.nodes[index]
        _kill(node.pid)
        await node.wait()

    async def restart(self, index: int) -> None:
        """Start the killed node ``index`` again on its ports, with its JetStream store."""
        await self.nodes[index].restart()

    async def stop(self) -> None:
        """Stop every node (each SIGTERM, SIGKILL after its grace) and drop a temporary store."""
        try:
            await asyncio.gather(*(node.stop() for node in self.nodes), return_exceptions=True)
        finally:
            if self._own_store:
                shutil.rmtree(self.store_dir, ignore_errors=True)


class RedisClusterServers(StartStop):
    """A Redis Cluster on 127.0.0.1: ``masters`` masters, one replica each (nodes
    ``masters .. 2 * masters - 1``). ``url`` lists every node for ``CASCADE_REDIS__URL`` (with
    ``CASCADE_REDIS__CLUSTER=true``)."""

    def __init__(
        self,
        masters: int = 3,
        *,
        log_dir: Path | None = None,
        data_dir: Path | None = None,
        node_timeout_ms: int = 1000,
        ready_timeout_s: float = 30.0,
    ) -> None:
        if masters < 3:
            raise ValueError("Redis Cluster needs at least 3 masters to fail over")
        self.masters: Final = masters
        self._own_data = data_dir is None
        self.data_dir: Final = data_dir or Path(tempfile.mkdtemp(prefix="cascade-redis-cluster-"))
        self._ready_timeout_s = ready_timeout_s
        self.nodes: Final[list[RedisServer]] = []
        for i in range(2 * masters):
            node_dir = self.data_dir / f"n{i}"
            node_dir.mkdir(parents=True, exist_ok=True)
            self.nodes.append(
                RedisServer(
                    # Redis 6 listens for its cluster bus on port + 10000 (7 has cluster-port).
                    free_port_pair(_BUS_OFFSET),
                    log_dir=log_dir,
                    extra_args=(
                        "--dir",
                        str(node_dir),
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        str(node_timeout_ms),
                        "--cluster-require-full-coverage",
                        "no",
                    ),
                )
            )
        self.node_ids: list[str] = []

    @property
    def url(self) -> str:
        """Every node's ``redis://`` URL, comma-separated (the client's startup nodes)."""
        return ",".join(f"redis://{LOOPBACK}:{node.port}" for node in self.nodes)

    def client(self, index: int) -> aioredis.Redis:
        """A plain client of node ``index`` (close it), for cluster commands in tests."""
        return aioredis.Redis(host=LOOPBACK, port=self.nodes[index].port, socket_timeout=2.0)

    async def start(self) -> None:
        """Start every node, form the cluster, wait until every slot is served and every
        replica is in sync."""
        try:
            await asyncio.gather(*(node.start() for node in self.nodes))
            await self._form()
            await self._wait(self._ready, "cluster not formed")
        except BaseException:
            await self.stop()
            raise

    async def _form(self) -> None:
        per_master = _SLOTS // self.masters
        ranges = [
            (i * per_master, _SLOTS - 1 if i == self.masters - 1 else (i + 1) * per_master - 1)
            for i in range(self.masters)
        ]
        clients = [self.client(i) for i in range(len(self.nodes))]
        try:
            self.node_ids = [
                _text(await c.execute_command("CLUSTER MYID"))  # type: ignore[no-untyped-call]
                for c in clients
            ]
            for node in self.nodes[1:]:
                await clients[0].execute_command("CLUSTER MEET", LOOPBACK, node.port)  # type: ignore[no-untyped-call]
            for i, (first, last) in enumerate(ranges):
                await clients[i].execute_command("CLUSTER ADDSLOTS", *range(first, last + 1))  # type: ignore[no-untyped-call]

            async def all_met() -> bool:
                for c in clients:
                    info = await _cluster_info(c)
                    if int(info["cluster_known_nodes"]) < len(self.nodes):
                        return False
                return True

            await self._wait(all_met, "nodes did not meet")
            for i in range(self.masters):
                replica = clients[self.masters + i]
                master_id = self.node_ids[i]

                async def replicate(
                    replica: aioredis.Redis = replica, master_id: str = master_id
                ) -> bool:
                    # Refused while the replica still shakes hands with its master.
                    await replica.execute_command("CLUSTER REPLICATE", master_id)  # type: ignore[no-untyped-call]
                    return True

                await self._wait(replicate, "a replica could not follow its master")
        finally:
            for c in clients:
                await c.aclose()

    async def _ready(self) -> bool:
        alive = [i for i, node in enumerate(self.nodes) if node.process.running]
        for i in alive:
            c = self.client(i)
            try:
                info = await _cluster_info(c)
                if info["cluster_state"] != "ok":
                    return False
                replication = await c.info("replication")
                if replication.get("role") == "slave" and (
                    replication.get("master_link_status") != "up"
                ):
                    return False
            finally:
                await c.aclose()
        return True

    async def _wait(self, check: Callable[[], Awaitable[bool]], what: str) -> None:
        deadline = time.monotonic() + self._ready_timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if await check():
                    return
            except Exception as exc:  # a node still starting
                last = exc
            await asyncio.sleep(_POLL_S)
        raise ServerStartError(f"Redis Cluster: {what} in {self._ready_timeout_s:.0f} s ({last!r})")

    async def master_of(self, slot: int) -> int:
        """Index of the node that serves ``slot`` now (asked of a live node)."""
        for i, node in enumerate(self.nodes):
            if not node.process.running:
                continue
            c = self.client(i)
            try:
                slots = await c.execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
            finally:
                await c.aclose()
            for first, last, master, *_ in slots:
                if first <= slot <= last:
                    port = int(master[1])
                    return next(j for j, n in enumerate(self.nodes) if n.port == port)
        raise ServerStartError(f"no live node knows slot {slot}")

    async def kill(self, index: int) -> None:
        """SIGKILL node ``index`` and reap it (its replica takes over if it was a master)."""
        node = self.nodes[index]
        _kill(node.pid)
        await node.wait()

    async def wait_failover(self, killed: int) -> None:
        """Wait until a live node's slot map names no slot served by node ``killed`` (its
        replica was promoted)."""
        port = self.nodes[killed].port

        async def promoted() -> bool:
            for i, node in enumerate(self.nodes):
                if i == killed or not node.process.running:
                    continue
                c = self.client(i)
                try:
                    slots = await c.execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
                finally:
                    await c.aclose()
                return all(int(master[1]) != port for _, _, master, *_ in slots)
            return False

        await self._wait(promoted, "no failover")

    async def restart(self, index: int) -> None:
        """Start the killed node ``index`` again (it rejoins, as a replica if it was replaced)."""
        await self.nodes[index].restart()

    async def stop(self) -> None:
        """Stop every node and drop a temporary data folder."""
        try:
            await asyncio.gather(*(node.stop() for node in self.nodes), return_exceptions=True)
        finally:
            if self._own_data:
                shutil.rmtree(self.data_dir, ignore_errors=True)
