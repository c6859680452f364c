"""The local stack: Redis, NATS, Triton, N screening workers and the orchestrator, on loopback.

:class:`LocalStack` starts them in dependency order, waits until each is healthy (the
orchestrator's gRPC health check says SERVING only once both models answered a warm-up), and
stops every process it started, in reverse order, however the block ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cascade.lifecycle import AsyncResourceGroup
from cascade.model_registry import load_registry
from cascade.servers import ManagedProcess, NatsServer, RedisServer, TritonServer
from cascade.servers._process import resolve_port

_READY_LINE: Final = "READY"


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
    triton_instances: int = 1
    triton_delay_ms: float = 0.0
    extra_env: dict[str, str] = field(default_factory=dict)


async def grpc_health_status(target: str, timeout_s: float = 1.0) -> int | None:
    """The whole server's health status at ``target``, or None if it does not answer."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return None
    return int(reply.status)


def _log_has_ready_line(log_path: Path) -> bool:
    try:
        return any(line.strip() == _READY_LINE for line in log_path.read_text().splitlines())
    except FileNotFoundError:
        return False


def service_env(
    *,
    model_dir: Path,
    redis_url: str,
    nats_url: str,
    triton_url: str,
    grpc_port: int,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """Environment for worker and orchestrator processes: ours replaced, the rest inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
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


def worker_process(
    name: str, env: dict[str, str], log_dir: Path, *, module: str = "stages.screening"
) -> ManagedProcess:
    """``python -m <module>`` (a screening worker), ready once it printed its READY line."""
    log_path = log_dir / f"{name}.log"

    async def ready() -> bool:
        return _log_has_ready_line(log_path)

    return ManagedProcess(
        name, [sys.executable, "-m", *module.split()], log_dir=log_dir, env=env, probe=ready
    )


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
    )


class LocalStack(AsyncResourceGroup):
    """Every process of the local stack; an async context manager. ``target`` is the endpoint."""

    def __init__(self, config: StackConfig) -> None:
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

    async def _start(self) -> None:
        cfg = self._config
        ports = cfg.ports
        registry = load_registry(cfg.model_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # The three servers start independently; start them together to save Triton's seconds.
        redis_server = RedisServer(ports.redis, log_dir=self.log_dir)
        nats_server = NatsServer(ports.nats, log_dir=self.log_dir)
        triton = TritonServer(
            registry.stage2_path,
            model_name=registry.stage2.triton_model or "",
            model_version=registry.stage2.triton_version or 1,
            grpc_port=ports.triton_grpc,
            http_port=ports.triton_http,
            metrics_port=ports.triton_metrics,
            work_dir=cfg.run_dir / "triton",
            log_dir=self.log_dir,
            delay_ms=cfg.triton_delay_ms,
            instance_count=cfg.triton_instances,
        )
        servers = (redis_server, nats_server, triton)
        results = await asyncio.gather(
            *(self._stack.enter_async_context(s) for s in servers), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
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
            extra=cfg.extra_env,
        )
        for i in range(cfg.workers):
            await self._stack.enter_async_context(
                worker_process(f"screening-worker-{i}", env, self.log_dir)
            )
        await self._stack.enter_async_context(orchestrator_process(env, self.log_dir))
