"""Start the naive baseline beside a running stack: its server and workers as processes.

It reuses the stack's Redis, NATS and Triton (pass their URLs, e.g. from
:class:`devstack.stack.LocalStack`), listens on its own loopback port and uses its own NATS subject
and queue group, so the two cascades share the servers but never each other's messages or keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from cascade.lifecycle import AsyncResourceGroup
from devstack.servers import resolve_port
from devstack.stack import orchestrator_process, service_env, worker_process

__all__ = ["NAIVE_QUEUE_GROUP", "NAIVE_SUBJECT_PREFIX", "NaiveStack"]

NAIVE_SUBJECT_PREFIX: Final = "naive.screen"
NAIVE_QUEUE_GROUP: Final = "naive-screening-workers"


class NaiveStack(AsyncResourceGroup):
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
        super().__init__()
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

    async def _start(self) -> None:
        self._log_dir.mkdir(parents=True, exist_ok=True)
        for i in range(self._workers):
            await self._stack.enter_async_context(
                worker_process(
                    f"naive-worker-{i}", self._env, self._log_dir, module="loadtests.naive worker"
                )
            )
        await self._stack.enter_async_context(
            orchestrator_process(
                self._env, self._log_dir, name="naive-server", module="loadtests.naive server"
            )
        )
