"""The outcome log's writer: labels stored on the JetStream stream ``OUTCOMES``, each acknowledged
before the caller hears back.

Used by ``ScoringService/ReportOutcome`` (:mod:`orchestrator.server`, on a NATS connection of its
own, never the screening one) and by ``cascade outcomes import``. Labels are not latency
critical but must not be lost, so unlike the decision log there is no spool: a label is stored
(JetStream acknowledged it, ``PubAck``) or the caller gets an error and sends it again, which
deduplication (message id ``<transaction id>:<label kind>``) makes harmless.

NATS and JetStream errors become the cascade's own (``Dependency.OUTCOME_LOG``) here only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from nats.aio.client import Client as NatsClient
from nats.js.api import StreamConfig

from cascade.errors import Dependency, DependencyError, translate_jetstream_errors
from cascade.jetstream_streams import ensure_stream, owned_stream_config
from cascade.nats_connection import connect_nats
from cascade.outcome_record import encode_outcome, outcome_message_id, outcome_subject
from cascade.settings import NatsSettings, OutcomeSettings
from cascade.v1 import outcomes_pb2, scoring_pb2

__all__ = ["OutcomeStore", "StoredOutcome", "outcome_stream_config"]

logger = logging.getLogger(__name__)

_MSG_ID_HEADER: Final = "Nats-Msg-Id"


@dataclass(frozen=True, slots=True)
class StoredOutcome:
    """JetStream's answer for one label: its stream sequence, and whether it was a duplicate."""

    seq: int
    duplicate: bool


def outcome_stream_config(settings: OutcomeSettings) -> StreamConfig:
    """The stream's configuration: limits retention on file storage, a long dedup window."""
    return owned_stream_config(
        name=settings.stream,
        description="Labels of scored transactions (cascade.v1.OutcomeRecord).",
        subject_prefix=settings.subject_prefix,
        max_age_s=settings.stream_max_age_s,
        replicas=settings.stream_replicas,
        dedup_window_s=settings.dedup_window_s,
    )


class OutcomeStore:
    """Stores validated outcomes on JetStream; an async context manager that opens its own
    NATS connection and ensures the stream. Every method raises ``DependencyError``
    (``Dependency.OUTCOME_LOG``) when NATS or JetStream fails."""

    def __init__(
        self,
        url: str,
        settings: OutcomeSettings,
        *,
        name: str = "cascade-outcomes",
        security: NatsSettings | None = None,
    ):
        self._url = url
        self._security = security
        self._settings = settings
        self._name = name
        self._nc: NatsClient | None = None
        self._stream_ready = False

    async def __aenter__(self) -> OutcomeStore:
        with translate_jetstream_errors(Dependency.OUTCOME_LOG):
            self._nc = await connect_nats(self._url, name=self._name, security=self._security)
        try:
            await self.ensure_stream()
        except Exception as exc:  # served anyway: ensured again on the first report
            logger.warning("outcome log: cannot ensure stream %s (%s)", self._settings.stream, exc)
        except BaseException:
            await self.__aexit__(None, None, None)  # a start cancelled leaves no connection open
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
        assert self._nc is not None, "OutcomeStore used outside its context"
        await ensure_stream(
            self._nc.jetstream(), outcome_stream_config(self._settings), Dependency.OUTCOME_LOG
        )
        self._stream_ready = True

    async def store(
        self,
        outcome: scoring_pb2.Outcome,
        received_at_ms: int,
        via: outcomes_pb2.OutcomeRecord.Via.ValueType,
    ) -> StoredOutcome:
        """Publish one validated outcome and wait for JetStream's ack (``ack_timeout_s``)."""
        assert self._nc is not None, "OutcomeStore used outside its context"
        if not self._stream_ready:
            await self.ensure_stream()
        js = self._nc.jetstream()
        with translate_jetstream_errors(Dependency.OUTCOME_LOG):
            ack = await js.publish(
                outcome_subject(self._settings.subject_prefix, outcome.label),
                encode_outcome(outcome, received_at_ms, via),
                timeout=self._settings.ack_timeout_s,
                stream=self._settings.stream,
                headers={_MSG_ID_HEADER: outcome_message_id(outcome)},
            )
        return StoredOutcome(seq=ack.seq, duplicate=bool(ack.duplicate))

    async def store_many(
        self,
        outcomes: Sequence[scoring_pb2.Outcome],
        received_at_ms: int,
        via: outcomes_pb2.OutcomeRecord.Via.ValueType,
        *,
        window: int = 128,
    ) -> list[StoredOutcome]:
        """Store many (a bulk import), ``window`` publishes in flight at once, each with its own
        ack timeout; every ack, in order. Raises at the first window with a failure (what was
        acknowledged before it stays stored; sending the file again is harmless)."""
        stored: list[StoredOutcome] = []
        for start in range(0, len(outcomes), window):
            chunk = outcomes[start : start + window]
            try:
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(self.store(o, received_at_ms, via)) for o in chunk]
            except* DependencyError as failed:  # the rest of the window was cancelled
                raise failed.exceptions[0] from None
            stored += [task.result() for task in tasks]
        return stored
