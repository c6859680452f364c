"""The decision log: every answer the orchestrator gives, published to JetStream off the request
path, spooled to disk when JetStream is slow or down, and replayed when it returns.

The request path calls :meth:`DecisionLog.record`: one bounded ``deque.append`` of references to
messages it already built (no await, no syscall, no encoding). One owned background task wakes
when the buffer stops being empty, waits ``batch_interval_ms`` for company, encodes up to
``batch_max_records`` records (:func:`cascade.decision_record.encode_decision`) and publishes them
all at once, each with the transaction id as ``Nats-Msg-Id``, then gathers their acks
(:class:`JetStreamSink`: one reply subscription, no future per record).

* Records JetStream did not acknowledge within ``ack_timeout_s`` go to the spool
  (:mod:`orchestrator.decision_spool`), and the log turns *spooling*: later batches go straight
  to the spool (no answer's record waits out an ack timeout), and every ``retry_interval_s`` one
  replay batch is tried (ensuring the stream first). The first fully acknowledged replay turns it
  back to publishing; the spool is then replayed a batch per round, beside the live batches.
* Deduplication by message id makes a replay of a record whose ack was lost harmless (within
  the stream's duplicate window).
* Bounds: ``buffer_max_records`` in memory, ``spool_max_bytes`` on disk; past either, records are
  dropped, counted in ``cascade_decision_log_dropped_total{reason}`` and logged at ERROR.
* Exit (after the gRPC server drained, so every answer is in the buffer): the task drains the
  buffer to JetStream (or the spool) within ``flush_timeout_s``; whatever is left then is
  spooled; the spool is closed for the next start to replay.

JetStream and NATS errors become the cascade's own (:func:`cascade.errors.
translate_jetstream_errors`) in :class:`JetStreamSink` only; the log never raises into a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from types import TracebackType
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import StreamConfig

from cascade import metrics
from cascade.decision_record import (
    PendingDecision,
    decision_subject,
    encode_decision,
    message_id,
)
from cascade.errors import (
    ConfigurationError,
    Dependency,
    DependencyError,
    DependencyUnavailable,
    translate_jetstream_errors,
)
from cascade.jetstream_streams import ensure_stream, owned_stream_config
from cascade.nats_connection import connect_nats
from cascade.settings import DecisionLogSettings, NatsSettings
from cascade.throttled_log import ThrottledLog
from cascade.v1 import decisions_pb2, scoring_pb2
from orchestrator.decision_spool import DecisionSpool, SpooledRecord

__all__ = ["DecisionLog", "DecisionSink", "InMemorySink", "JetStreamSink", "stream_config"]

logger = logging.getLogger(__name__)

_MSG_ID_HEADER: Final = "Nats-Msg-Id"
# Records encoded between two passes of the event loop (~20 us each on this machine).
_ENCODE_SLICE: Final = 32


class DecisionSink(Protocol):
    """Where records go: JetStream (:class:`JetStreamSink`) or memory (:class:`InMemorySink`)."""

    async def ensure_stream(self) -> None:
        """Create or update the stream; raises ``DependencyError``."""
        ...

    async def publish(self, records: Sequence[SpooledRecord], timeout_s: float) -> list[bool]:
        """Publish all of ``records`` at once; which were acknowledged within ``timeout_s``.
        Raises ``DependencyError`` when nothing could be sent."""
        ...


def stream_config(settings: DecisionLogSettings) -> StreamConfig:
    """The stream's configuration: limits retention on file storage, the dedup window."""
    return owned_stream_config(
        name=settings.stream,
        description="Every answer of the fraud-scoring cascade (cascade.v1.DecisionRecord).",
        subject_prefix=settings.subject_prefix,
        max_age_s=settings.stream_max_age_s,
        replicas=settings.stream_replicas,
        dedup_window_s=settings.dedup_window_s,
        max_bytes=settings.stream_max_bytes,
    )


class JetStreamSink:
    """Publishes records to JetStream over a NATS connection of its own; an async context
    manager. Acks of a batch come back on one reply subscription (``<inbox>.<batch>.<i>``) and
    resolve one future per batch: ~7 µs of CPU per record, against ~14 µs with nats-py's
    ``publish_async`` (a future, a token and a JSON parse per record) on this machine."""

    def __init__(
        self, url: str, settings: DecisionLogSettings, *, security: NatsSettings | None = None
    ) -> None:
        self._url = url
        self._settings = settings
        self._security = security
        self._nc: NatsClient | None = None
        self._inbox = ""
        self._batch = 0
        self._waiting: dict[int, _AckBatch] = {}
        self.duplicates = 0

    async def __aenter__(self) -> JetStreamSink:
        try:
            with translate_jetstream_errors():
                self._nc = nc = await connect_nats(
                    self._url, name="cascade-decision-log", security=self._security
                )
                self._inbox = nc.new_inbox()
                await nc.subscribe(f"{self._inbox}.>", cb=self._on_ack)
        except BaseException:
            await self.__aexit__(None, None, None)  # a start cut short leaves no connection open
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()

    async def ensure_stream(self) -> None:
        """Add the stream, or update it when it exists with another configuration."""
        assert self._nc is not None
        await ensure_stream(
            self._nc.jetstream(), stream_config(self._settings), Dependency.DECISION_LOG
        )

    async def publish(self, records: Sequence[SpooledRecord], timeout_s: float) -> list[bool]:
        """Send every record, then wait (up to ``timeout_s``) for all their acks."""
        nc = self._nc
        assert nc is not None
        self._batch += 1
        batch_id = self._batch
        batch = _AckBatch(len(records), asyncio.get_running_loop().create_future())
        self._waiting[batch_id] = batch
        prefix = f"{self._inbox}.{batch_id}."
        try:
            with translate_jetstream_errors():
                for i, record in enumerate(records):
                    await nc.publish(
                        record.subject,
                        record.payload,
                        reply=prefix + str(i),
                        headers={_MSG_ID_HEADER: record.msg_id} if record.msg_id else None,
                    )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await batch.done
            return batch.acked
        finally:
            del self._waiting[batch_id]

    async def _on_ack(self, msg: Msg) -> None:
        # <inbox>.<batch>.<i>; an error ack ({"error": ...}) or a no-responders status is not one.
        _, batch_token, index_token = msg.subject.rsplit(".", 2)
        batch = self._waiting.get(int(batch_token))
        data = msg.data
        if batch is None or b'"seq"' not in data or b'"error"' in data:
            return
        if b'"duplicate":true' in data:
            self.duplicates += 1
            metrics.DECISIONS_DUPLICATES.inc()
        batch.ack(int(index_token))


class _AckBatch:
    """The acks of one published batch, and the future set once all arrived."""

    __slots__ = ("acked", "done", "left")

    def __init__(self, n: int, done: asyncio.Future[None]) -> None:
        self.acked = [False] * n
        self.left = n
        self.done = done
        if n == 0:
            done.set_result(None)

    def ack(self, i: int) -> None:
        if 0 <= i < len(self.acked) and not self.acked[i]:
            self.acked[i] = True
            self.left -= 1
            if self.left == 0 and not self.done.done():
                self.done.set_result(None)


class InMemorySink:
    """The in-memory twin of :class:`JetStreamSink` for tests: a dict by message id (as the
    dedup window would keep it), switchable down (``up = False``: nothing is acknowledged)."""

    def __init__(self) -> None:
        self.up = True
        self.stream_ensured = 0
        self.messages: dict[str, SpooledRecord] = {}
        self.without_id: list[SpooledRecord] = []
        self.published = 0
        self.calls = 0
        self.called = asyncio.Event()
        """Set on every publish or ensure_stream call (tests await it instead of sleeping)."""
        self.gate: asyncio.Event | None = None
        """When set to an Event, publish waits for it first (a slow JetStream)."""

    async def ensure_stream(self) -> None:
        self.calls += 1
        self.called.set()
        if not self.up:
            raise _down()
        self.stream_ensured += 1

    async def publish(self, records: Sequence[SpooledRecord], timeout_s: float) -> list[bool]:
        self.calls += 1
        self.called.set()
        if self.gate is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self.gate.wait()
            if not self.gate.is_set():
                return [False] * len(records)
        if not self.up:
            raise _down()
        for record in records:
            self.published += 1
            if record.msg_id is None:
                self.without_id.append(record)
            else:
                self.messages.setdefault(record.msg_id, record)
        return [True] * len(records)


def _down() -> DependencyError:
    return DependencyUnavailable(Dependency.DECISION_LOG, "in-memory sink is down")


class DecisionLog:
    """The buffer, the spool and the background task that moves records from one to JetStream.

    An async context manager; :meth:`record` is all the request path calls."""

    def __init__(
        self,
        sink: DecisionSink,
        settings: DecisionLogSettings,
        *,
        policy_version: str,
        spool: DecisionSpool | None = None,
    ) -> None:
        try:
            self._subject = decision_subject(settings.subject_prefix, policy_version)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        self._sink = sink
        self._settings = settings
        self._subjects: dict[str, str] = {policy_version: self._subject}
        self._spool = spool or DecisionSpool(
            settings.spool_dir,
            max_bytes=settings.spool_max_bytes,
            segment_bytes=settings.spool_segment_bytes,
        )
        self._buffer: deque[PendingDecision] = deque()
        self._max_buffer = settings.buffer_max_records
        self._batch_max = settings.batch_max_records
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._publishing = False  # True: batches go to JetStream; False: to the spool
        self._next_retry_s = 0.0
        self._drop_log = ThrottledLog(logger, level=logging.ERROR)
        self._spool_log = ThrottledLog(logger)
        self._recorded = 0  # records appended to the buffer
        self._settled = 0  # of those, published, spooled or dropped by the background task
        self._settled_changed = asyncio.Event()
        self.published = 0
        self.spooled = 0
        self.replayed = 0
        self.dropped: dict[str, int] = {}

    # --- the request path -----------------------------------------------------------------------

    def record(
        self,
        transaction: scoring_pb2.Transaction,
        answer: scoring_pb2.ScoreResponse,
        features: npt.NDArray[np.float32] | None,
        method: decisions_pb2.DecisionRecord.Method.ValueType,
    ) -> None:
        """Queue one answer's record; never blocks, never raises. The messages must not be
        changed afterwards (they are encoded later)."""
        buffer = self._buffer
        if len(buffer) >= self._max_buffer:
            self._drop("buffer_full", 1)
            return
        buffer.append(
            PendingDecision(transaction, answer, features, time.time_ns() // 1_000_000, method)
        )
        self._recorded += 1
        n = len(buffer)
        if n == 1 or n == self._batch_max:
            self._wake.set()

    # --- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> DecisionLog:
        self._spool.open()
        try:
            await self._sink.ensure_stream()
            self._publishing = True
        except DependencyError as exc:
            logger.warning(
                "decision log: cannot ensure stream %s (%s); spooling until it can",
                self._settings.stream,
                exc,
            )
        self._update_gauges()
        self._task = asyncio.create_task(self._run(), name="decision-log-publisher")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task, self._task = self._task, None
        self._stopping = True
        self._wake.set()
        started = time.monotonic()
        logger.info("decision log: flushing %d buffered records", len(self._buffer))
        if task is not None:
            try:
                async with asyncio.timeout(self._settings.flush_timeout_s):
                    await asyncio.shield(task)
            except TimeoutError:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._buffer:
            left = self._take(len(self._buffer))
            self._to_spool(left)
            logger.warning("decision log: %d records spooled at shutdown", len(left))
        self._update_gauges()
        self._spool.close()
        logger.info(
            "decision log: flushed in %.2f s (%d published, %d spooled, %d replayed in all)",
            time.monotonic() - started,
            self.published,
            self.spooled,
            self.replayed,
        )

    # --- the background task --------------------------------------------------------------------

    async def _run(self) -> None:
        interval_s = self._settings.batch_interval_ms / 1000.0
        batch_max = self._settings.batch_max_records
        while True:
            if not self._buffer:
                if self._stopping:
                    return
                self._wake.clear()
                if self._spool.empty:
                    await self._wake.wait()
                else:  # a replay is due at _next_retry_s, or a record comes first
                    delay_s = self._next_retry_s - time.monotonic()
                    if delay_s > 0:
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(delay_s):
                                await self._wake.wait()
            if self._buffer and len(self._buffer) < batch_max and interval_s and not self._stopping:
                # Linger for company; a full batch or the shutdown ends the wait early.
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval_s):
                        await self._wake.wait()
            if self._buffer:
                n = min(len(self._buffer), batch_max)
                await self._send(await self._take_sliced(n))
                self._settled += n
                self._settled_changed.set()
            if not self._stopping:
                await self._replay_some(interval_s)
            self._update_gauges()

    def _subject_for(self, policy_version: str) -> str:
        """The subject of a record answered under ``policy_version`` (a canary's candidate
        policy has its own; an unusable name falls back to the champion's)."""
        subject = self._subjects.get(policy_version)
        if subject is None:
            try:
                subject = decision_subject(self._settings.subject_prefix, policy_version)
            except ValueError:
                subject = self._subject
            self._subjects[policy_version] = subject
        return subject

    def _take(self, n: int) -> list[SpooledRecord]:
        buffer = self._buffer
        out: list[SpooledRecord] = []
        for _ in range(n):
            pending = buffer.popleft()
            subject = self._subject_for(pending.answer.versions.policy)
            try:
                payload = encode_decision(pending)
            except Exception:  # a bug, not an outage: count it, never stop the publisher
                logger.exception("decision log: could not encode a record")
                self._drop("unencodable", 1)
                continue
            out.append(SpooledRecord(subject, message_id(pending.answer.transaction_id), payload))
        return out

    async def _take_sliced(self, n: int) -> list[SpooledRecord]:
        """:meth:`_take` ``_ENCODE_SLICE`` records at a time, with the event loop let run in
        between (a batch of 512 encoded at once held it for ~10 ms, and every Score call with
        it). Cancelled meanwhile, the records encoded so far go to the spool; the rest stay in
        the buffer, which the shutdown spools."""
        records: list[SpooledRecord] = []
        try:
            while n > 0:
                k = min(n, _ENCODE_SLICE)
                records += self._take(k)
                n -= k
                if n:
                    await asyncio.sleep(0)
        except asyncio.CancelledError:
            self._to_spool(records)
            raise
        return records

    async def _send(self, records: list[SpooledRecord]) -> None:
        if not self._publishing:
            self._to_spool(records)
            return
        try:
            acked = await self._publish(records)
        except asyncio.CancelledError:
            self._to_spool(records)  # shutdown cut the flush short: keep them
            raise
        missing = [r for r, ok in zip(records, acked, strict=True) if not ok]
        n_acked = len(records) - len(missing)
        self.published += n_acked
        metrics.DECISIONS_PUBLISHED.inc(n_acked)
        if missing:
            self._publishing = False
            self._next_retry_s = time.monotonic() + self._settings.retry_interval_s
            self._to_spool(missing)

    async def _publish(self, records: Sequence[SpooledRecord]) -> list[bool]:
        try:
            return await self._sink.publish(records, self._settings.ack_timeout_s)
        except DependencyError as exc:
            logger.debug("decision log: publish failed: %s", exc)
            return [False] * len(records)

    async def _replay_some(self, pace_s: float) -> None:
        """One replay batch from the spool when one is due: at once while publishing (paced by
        ``pace_s``), every ``retry_interval_s`` while JetStream fails."""
        now = time.monotonic()
        if self._spool.empty or now < self._next_retry_s:
            return
        self._next_retry_s = now + self._settings.retry_interval_s
        if not self._publishing:
            try:
                await self._sink.ensure_stream()
            except DependencyError as exc:
                logger.debug("decision log: stream not ensured: %s", exc)
                return
        corrupt_before = self._spool.corrupt_records
        records, position = self._spool.read(self._settings.replay_batch_records)
        if self._spool.corrupt_records > corrupt_before:
            self._drop("corrupt", self._spool.corrupt_records - corrupt_before)
        if not records:
            return
        acked = await self._publish(records)
        if not all(acked):
            self._publishing = False
            return
        self._spool.commit(position)
        self.replayed += len(records)
        metrics.DECISIONS_REPLAYED.inc(len(records))
        if not self._publishing:
            logger.warning("decision log: JetStream acknowledges again; replaying the spool")
        self._publishing = True
        self._next_retry_s = time.monotonic() + pace_s

    def _to_spool(self, records: list[SpooledRecord]) -> None:
        if not records:
            return
        try:
            refused = self._spool.append(records)
        except OSError as exc:
            logger.error("decision log: spool write failed: %s", exc)
            refused = len(records)
        kept = len(records) - refused
        self.spooled += kept
        metrics.DECISIONS_SPOOLED.inc(kept)
        if kept:
            self._spool_log.event(
                "decision log: JetStream did not acknowledge; %d records spooled to %s so far",
                self.spooled,
                self._spool.slot_dir,
            )
        if refused:
            self._drop("spool_full", refused)

    def _drop(self, reason: str, n: int) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n
        metrics.DECISIONS_DROPPED.labels(reason).inc(n)
        self._drop_log.event(
            "decision log: DROPPED %d decision records (%s); %d dropped in all",
            n,
            reason,
            sum(self.dropped.values()),
        )

    def _update_gauges(self) -> None:
        metrics.DECISIONS_BUFFERED.set(len(self._buffer))
        metrics.DECISIONS_SPOOL_BYTES.set(self._spool.size_bytes)

    # --- for tests and the server ---------------------------------------------------------------

    async def flush(self) -> None:
        """Wait until every record queued so far was published, spooled or dropped."""
        target = self._recorded
        while self._settled < target and self._task is not None and not self._task.done():
            self._settled_changed.clear()
            await self._settled_changed.wait()

    @property
    def publishing(self) -> bool:
        """True while batches go to JetStream (False: to the spool)."""
        return self._publishing

    @property
    def spool(self) -> DecisionSpool:
        """This process's spool."""
        return self._spool

    @property
    def pending(self) -> int:
        """Records in memory, not yet published or spooled."""
        return len(self._buffer)
