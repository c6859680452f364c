"""Work done after the answer is sent: output-cache writes and card-history updates.

One owned background task drains a bounded queue and writes in batches (one Redis round trip per
batch), 5 ms after the first item arrives: the response goes out first, and at a few hundred
answers a second several answers share a round trip instead of paying one each. A card's next
transaction rarely follows within 5 ms; a retry that does is scored again, identically, and so
is one after the write (its own entry is neither read nor written twice). Batches stay small
(64 writes): the pipeline is built on the request path's event loop, and a 256-write batch
after a large ScoreBatch was seen to hold a concurrent lookup past its 5 ms cap. Failures are
logged and counted, never raised into a request. On exit the queue is drained (bounded by
``drain_timeout_s``), then the task is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from cascade import metrics
from cascade.errors import DependencyError
from orchestrator.online_store import OnlineStore, StoreWrite

logger = logging.getLogger(__name__)

_LOG_EVERY_S: Final = 10.0


@dataclass(slots=True)
class WriterStats:
    """Counters for monitoring the writer."""

    written: int = 0
    failed: int = 0
    dropped: int = 0
    batches: int = 0


class PostAnswerWriter:
    """Batches :class:`StoreWrite` items to the store off the request path."""

    def __init__(
        self,
        store: OnlineStore,
        *,
        max_pending: int = 10_000,
        max_batch: int = 64,
        linger_s: float = 0.005,
        drain_timeout_s: float = 2.0,
    ) -> None:
        self._store = store
        self._queue: asyncio.Queue[StoreWrite] = asyncio.Queue(maxsize=max_pending)
        self._max_batch = max_batch
        self._linger_s = linger_s
        self._drain_timeout_s = drain_timeout_s
        self._task: asyncio.Task[None] | None = None
        self._last_log_s = 0.0
        self.stats = WriterStats()

    async def __aenter__(self) -> PostAnswerWriter:
        self._task = asyncio.create_task(self._run(), name="post-answer-writer")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        try:
            async with asyncio.timeout(self._drain_timeout_s):
                await self.flush()
        except TimeoutError:
            logger.warning(
                "post-answer writer: %d writes not flushed at shutdown", self._queue.qsize()
            )
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def flush(self) -> None:
        """Wait until every write submitted so far has been attempted."""
        await self._queue.join()

    def submit(self, write: StoreWrite) -> None:
        """Queue ``write``; never blocks. When the queue is full the write is dropped and counted."""
        try:
            self._queue.put_nowait(write)
        except asyncio.QueueFull:
            self.stats.dropped += 1
            metrics.POST_ANSWER_WRITES.labels("dropped").inc()
            self._log_problem(
                "post-answer queue full; dropped %d writes so far", self.stats.dropped
            )

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            if self._linger_s:
                await asyncio.sleep(self._linger_s)
            batch = [first]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._store.write(batch)
                self.stats.written += len(batch)
                metrics.POST_ANSWER_WRITES.labels("written").inc(len(batch))
            except DependencyError as exc:
                self.stats.failed += len(batch)
                metrics.POST_ANSWER_WRITES.labels("failed").inc(len(batch))
                self._log_problem(
                    "post-answer write failed (%s); %d failed so far", exc, self.stats.failed
                )
            finally:
                self.stats.batches += 1
                for _ in batch:
                    self._queue.task_done()

    def _log_problem(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_log_s >= _LOG_EVERY_S:
            self._last_log_s = now
            logger.warning(message, *args)
