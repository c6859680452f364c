"""The in-memory twin of a model stage, for unit tests: scores with a function, can fail or lag.

:class:`~orchestrator.screening_client.InMemoryScreener` and
:class:`~orchestrator.heavy_client.InMemoryHeavyScorer` are this under their protocols' names.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from cascade.errors import Dependency, DependencyTimeout

ScoreFn = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]


class StageTwin:
    """Behaves like a remote stage: ``failure`` is raised, a ``delay_s`` past the timeout times out."""

    def __init__(
        self,
        dependency: Dependency,
        score_fn: ScoreFn,
        *,
        delay_s: float = 0.0,
        failure: Exception | None = None,
    ) -> None:
        self.dependency = dependency
        self.score_fn = score_fn
        self.delay_s = delay_s
        self.failure = failure
        self.calls = 0
        self.timeouts_s: list[float] = []
        """The timeout each call was given, so tests can check the caller's caps."""

    async def run(
        self, batch: npt.NDArray[np.float32], timeout_s: float
    ) -> npt.NDArray[np.float32]:
        """Score ``batch`` as the real stage would, within ``timeout_s``."""
        self.calls += 1
        self.timeouts_s.append(timeout_s)
        if self.failure is not None:
            raise self.failure
        if self.delay_s > timeout_s:
            await asyncio.sleep(timeout_s)
            raise DependencyTimeout(self.dependency, "no answer in time")
        await asyncio.sleep(self.delay_s)
        return self.score_fn(batch)
