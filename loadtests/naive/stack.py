"""Start the naive baseline beside a running stack: its server and workers as processes.

It reuses the stack's Redis, NATS and Triton (pass their URLs, e.g. from
:class:`cascade.stack.LocalStack`), listens on its own loopback port and uses its own NATS subject
and queue group, so the two cascades share the servers but never each other's messages or keys.
"""

from __future__ import annotations

import asyncio
import sys
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Final

from grpc_health.v1 import health_pb2

from cascade.servers import ManagedProcess
from cascade.servers._process import ReadinessProbe, resolve_port
from cascade.stack import grpc_health_status, service_env

__all__ = ["NAIVE_QUEUE_GROUP", "NAIVE_SUBJECT_PREFIX", "NaiveStack"]

NAIVE_SUBJECT_PREFIX: Final = "naive.screen"
NAIVE_QUEUE_GROUP: Final = "naive-screening-workers"


def _ready_line(log_path: Path) -> ReadinessProbe:
    async def probe() -> bool:
        try:
            text = await asyncio.to_thread(log_path.read_text)
        except FileNotFoundError:
            return False
        return any(line.strip() == "READY" for line in text.splitlines())

    return probe


def _serving(target: str) -> ReadinessProbe:
    async def probe() -> bool:
        status = await grpc_health_status(target)
        return status is not None and status == int(health_pb2.HealthCheckResponse.SERVING)

    return probe


class NaiveStack:
    """The naive server plus ``workers`` naive screening workers; an async context manager.

    ``target`` is the naive server's ``127.0.0.1:PORT``.
    """

    def __init__(
        self,
        *,
        model_dir: Path,
        redis_url: str,
        nats_url: str,
        triton_url: str,
        log_dir: Path,
        workers: int = 2,
        port: int = 0,
    ) -> None:
        self.port = resolve_port(port)
        self.target = f"127.0.0.1:{self.port}"
        self._log_dir = log_dir
        self._workers = workers
        self._env = service_env(
            model_dir=model_dir,
            redis_url=redis_url,
            nats_url=nats_url,
            triton_url=triton_url,
            grpc_port=self.port,
            extra={
                "CASCADE_NATS__SUBJECT_PREFIX": NAIVE_SUBJECT_PREFIX,
                "CASCADE_NATS__QUEUE_GROUP": NAIVE_QUEUE_GROUP,
                "CASCADE_LOG_LEVEL": "WARNING",
            },
        )
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> NaiveStack:
        try:
            self._log_dir.mkdir(parents=True, exist_ok=True)
            for i in range(self._workers):
                name = f"naive-worker-{i}"
                await self._stack.enter_async_context(
                    ManagedProcess(
                        name,
                        [sys.executable, "-m", "loadtests.naive", "worker"],
                        log_dir=self._log_dir,
                        env=self._env,
                        probe=_ready_line(self._log_dir / f"{name}.log"),
                    )
                )
            await self._stack.enter_async_context(
                ManagedProcess(
                    "naive-server",
                    [sys.executable, "-m", "loadtests.naive", "server"],
                    log_dir=self._log_dir,
                    env=self._env,
                    probe=_serving(self.target),
                    ports=(self.port,),
                    start_timeout_s=60.0,
                )
            )
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()
