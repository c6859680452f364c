"""One worker process serving every stage-1 version the registry asks for, following its changes.

Each version is a :class:`~stages.screening.worker.ScreeningWorker` of its own (its model, its
subject ``{prefix}.{version}``, its heartbeats), so the request names the version by its subject
and the champion's worker is exactly what it was without rollouts. The pool serves the
champion's stage 1 and, while a canary runs (``rollout.canary_share`` > 0), the candidate's.

When ``registry.json`` changes, versions it newly names are loaded and answering before the
pool moves on; versions it no longer names keep answering for ``rollout.retire_grace_s``, so
orchestrators still on them switch first (they switch once the new version answers), then
drain. A registry that cannot be loaded leaves the pool as it is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import AsyncExitStack
from types import TracebackType

from opentelemetry import trace

from cascade.errors import ConfigurationError
from cascade.model_registry import Registry, StageArtifact, load_registry
from cascade.registry_watch import RegistryWatch
from cascade.settings import Settings
from stages.screening.model import ScreeningModel
from stages.screening.worker import ScreeningWorker

__all__ = ["ScreeningPool", "wanted_versions"]

logger = logging.getLogger(__name__)


def wanted_versions(registry: Registry, canary_share: float) -> dict[str, StageArtifact]:
    """The stage-1 versions a worker serves: the champion's, and the candidate's in a canary
    (the registry's share, else ``canary_share``, the process setting, above 0)."""
    return registry.stage1_versions(with_candidate=registry.canary_share(canary_share) > 0.0)


class ScreeningPool:
    """The worker process's versions; an async context manager (a task follows the registry)."""

    def __init__(
        self,
        settings: Settings,
        tracer: trace.Tracer,
        *,
        worker_factory: Callable[[ScreeningModel, str], ScreeningWorker] | None = None,
    ) -> None:
        self._settings = settings
        self._tracer = tracer
        self._factory = worker_factory or self._worker
        self._served: dict[str, AsyncExitStack] = {}
        self._follow: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def versions(self) -> list[str]:
        """The versions answered now (retiring ones included until they drained)."""
        return sorted(self._served)

    def _worker(self, model: ScreeningModel, feature_set: str) -> ScreeningWorker:
        s = self._settings
        return ScreeningWorker(
            model,
            nats_url=s.nats.url,
            subject_prefix=s.nats.subject_prefix,
            queue_group=s.nats.queue_group,
            feature_set=feature_set,
            tracer=self._tracer,
            heartbeat_s=s.hedging.heartbeat_s,
            nats_security=s.nats,
        )

    async def _serve(self, registry: Registry, artifact: StageArtifact) -> None:
        model = ScreeningModel(
            registry.model_dir / artifact.path,
            version=artifact.version,
            intra_op_threads=self._settings.screening.intra_op_threads,
        )
        stack = AsyncExitStack()
        await stack.enter_async_context(self._factory(model, registry.feature_set))
        self._served[artifact.version] = stack

    async def _apply(self, registry: Registry) -> None:
        wanted = wanted_versions(registry, self._settings.rollout.canary_share)
        for version, artifact in wanted.items():
            if version not in self._served:
                await self._serve(registry, artifact)
                logger.info("screening pool: now serving %s", version)
        for version in [v for v in self._served if v not in wanted]:
            stack = self._served.pop(version)
            task = asyncio.create_task(self._retire(version, stack), name=f"retire-{version}")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _retire(self, version: str, stack: AsyncExitStack) -> None:
        try:
            await asyncio.sleep(self._settings.rollout.retire_grace_s)
        finally:
            await stack.aclose()
            logger.info("screening pool: stopped serving %s", version)

    async def __aenter__(self) -> ScreeningPool:
        registry = load_registry(self._settings.model_dir)
        await self._apply(registry)
        self._follow = asyncio.create_task(self._follow_registry(), name="screening-registry")
        return self

    async def _follow_registry(self) -> None:
        watch = RegistryWatch(self._settings.model_dir)
        while True:
            await asyncio.sleep(self._settings.rollout.reload_interval_s)
            if not watch.changed():
                continue
            try:
                await self._apply(load_registry(self._settings.model_dir))
            except ConfigurationError as exc:
                logger.error("registry changed but cannot be served, keeping the old: %s", exc)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._follow is not None:
            self._follow.cancel()
            await asyncio.gather(self._follow, return_exceptions=True)
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        served, self._served = self._served, {}
        for stack in served.values():
            await stack.aclose()
