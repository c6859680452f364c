"""The quality job: reads the ``DECISIONS`` and ``OUTCOMES`` streams into a
:class:`cascade.quality.QualityJoiner` and reports, once (``cascade quality``) or for ever,
serving its latest report as Prometheus gauges (``cascade quality --serve``).

It runs as its own process (``python -m cascade.quality_job``, settings from ``CASCADE_*``:
``quality``, the decision log's and the outcomes' streams, ``metrics_port``; or
``cascade quality --serve`` on a workstation), never in the orchestrator: joining, sorting scores for PR-AUC and
binning features cost CPU and memory proportional to the windows (a week of decisions), which
must not share a core with the scoring path. It only reads the streams (ordered push consumers:
ephemeral, no state on the server), so any number can run, and one that restarts rebuilds its
state from the streams.

NATS errors become the cascade's own (``Dependency.DECISION_LOG`` / ``OUTCOME_LOG``) here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Final

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cascade.decision_record import decode_decision
from cascade.drift import DriftReference, load_drift_reference
from cascade.errors import Dependency, translate_jetstream_errors
from cascade.lifecycle import cancel_and_wait
from cascade.nats_connection import connect_nats
from cascade.outcome_record import FRAUD_LABELS, decode_outcome
from cascade.quality import (
    DecisionPoint,
    QualityJoiner,
    QualityReport,
    Unlabelled,
    decision_point,
)
from cascade.settings import Settings
from cascade.v1 import decisions_pb2

__all__ = [
    "QualityCollector",
    "QualityService",
    "StreamNames",
    "load_references",
    "measure_once",
    "read_outcome_labels",
    "report_metrics",
]

logger = logging.getLogger(__name__)

_IDLE_TIMEOUT_S: Final = 2.0
_VERSION_LABELS: Final = ["window", "policy", "stage1", "stage2"]


class StreamNames:
    """The two streams' names (settings ``decision_log.stream`` and ``outcomes.stream``)."""

    def __init__(self, decisions: str = "DECISIONS", outcomes: str = "OUTCOMES") -> None:
        self.decisions = decisions
        self.outcomes = outcomes


def load_references(model_dir: Path, stage1_versions: list[str]) -> dict[str, DriftReference]:
    """The drift reference of each stage-1 version that has one beside its model."""
    found = {}
    for version in stage1_versions:
        reference = load_drift_reference(model_dir, version)
        if reference is not None:
            found[version] = reference
    return found


def _point(joiner: QualityJoiner, record: decisions_pb2.DecisionRecord) -> DecisionPoint:
    reference = joiner.references.get(record.answer.versions.stage1)
    columns = tuple(f.index for f in reference.features) if reference else ()
    return decision_point(record, columns)


def _on_decision(joiner: QualityJoiner) -> Callable[[bytes, int], None]:
    def add(data: bytes, seq: int) -> None:
        try:
            joiner.add_decision(_point(joiner, decode_decision(data)))
        except ValueError:
            logger.warning("quality: skipping undecodable decision at stream seq %d", seq)

    return add


def _on_outcome(joiner: QualityJoiner) -> Callable[[bytes, int], None]:
    def add(data: bytes, seq: int) -> None:
        try:
            record = decode_outcome(data)
        except ValueError:
            logger.warning("quality: skipping undecodable outcome at stream seq %d", seq)
            return
        o = record.outcome
        joiner.add_outcome(o.transaction_id, o.label, o.reported_at_ms)

    return add


def _deliver_from(since_ms: int | None) -> tuple[DeliverPolicy, ConsumerConfig]:
    config = ConsumerConfig()
    if since_ms is None:
        return DeliverPolicy.ALL, config
    config.opt_start_time = datetime.fromtimestamp(since_ms / 1000, tz=UTC)
    return DeliverPolicy.BY_START_TIME, config


async def _read_to_end(
    nc: NatsClient,
    stream: str,
    since_ms: int | None,
    add: Callable[[bytes, int], None],
    dependency: Dependency,
) -> int:
    """Every message of ``stream`` stored at or after ``since_ms`` that was there when this
    started; returns how many."""
    js = nc.jetstream()
    deliver, config = _deliver_from(since_ms)
    n = 0
    with translate_jetstream_errors(dependency):
        try:
            info = await js.stream_info(stream)
        except NotFoundError:  # nothing recorded yet (no label reported so far): empty
            logger.info("quality: no stream %s yet; reading it as empty", stream)
            return 0
        if not info.state.messages:
            return 0
        sub = await js.subscribe(
            ">", stream=stream, ordered_consumer=True, deliver_policy=deliver, config=config
        )
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=_IDLE_TIMEOUT_S)
                except TimeoutError:
                    return n
                add(msg.data, msg.metadata.sequence.stream)
                n += 1
                if msg.metadata.num_pending == 0:
                    return n
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


async def read_outcome_labels(url: str, stream: str = "OUTCOMES") -> dict[str, bool]:
    """Every transaction the outcome stream labels: fraud (True) when any label says fraud
    (confirmed fraud or chargeback; a fraud label wins over a genuine one, as in the joiner),
    else genuine. Raises ``DependencyError`` when the stream cannot be read; a stream that does
    not exist yet holds no labels."""
    labels: dict[str, bool] = {}

    def add(data: bytes, seq: int) -> None:
        try:
            o = decode_outcome(data).outcome
        except ValueError:
            logger.warning("labels: skipping undecodable outcome at stream seq %d", seq)
            return
        labels[o.transaction_id] = labels.get(o.transaction_id, False) or (o.label in FRAUD_LABELS)

    with translate_jetstream_errors(Dependency.OUTCOME_LOG):
        nc = await connect_nats(url, name="cascade-labels")
    try:
        await _read_to_end(nc, stream, None, add, Dependency.OUTCOME_LOG)
    finally:
        await nc.close()
    return labels


async def measure_once(
    url: str,
    *,
    windows_s: list[int],
    references: dict[str, DriftReference],
    streams: StreamNames | None = None,
    unlabelled: Unlabelled = "genuine",
    now_ms: int | None = None,
) -> QualityReport:
    """Read the decisions of the longest window and every outcome since its start, join, and
    measure. Raises ``DependencyError`` when a stream cannot be read."""
    streams = streams or StreamNames()
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    since_ms = now_ms - max(windows_s) * 1000
    joiner = QualityJoiner(references=references, unlabelled=unlabelled)
    with translate_jetstream_errors(Dependency.DECISION_LOG):
        nc = await connect_nats(url, name="cascade-quality")
    try:
        await _read_to_end(
            nc, streams.decisions, since_ms, _on_decision(joiner), Dependency.DECISION_LOG
        )
        # Labels of these decisions were all stored after the decisions were.
        await _read_to_end(
            nc, streams.outcomes, since_ms, _on_outcome(joiner), Dependency.OUTCOME_LOG
        )
    finally:
        await nc.close()
    return joiner.report(now_ms, windows_s)


def report_metrics(report: QualityReport) -> list[GaugeMetricFamily]:
    """Every quality gauge of ``report``; undefined values (NaN) are left out, not exported."""
    v = _VERSION_LABELS
    families = {
        "precision": GaugeMetricFamily(
            "cascade_quality_precision",
            "Precision at a policy threshold (DECLINE, REVIEW) over a window of decision time.",
            labels=[*v, "threshold"],
        ),
        "recall": GaugeMetricFamily(
            "cascade_quality_recall",
            "Recall at a policy threshold (DECLINE, REVIEW) over a window of decision time.",
            labels=[*v, "threshold"],
        ),
        "pr_auc": GaugeMetricFamily(
            "cascade_quality_pr_auc",
            "PR-AUC (average precision) of a stage's scores.",
            labels=[*v, "stage"],
        ),
        "decisions": GaugeMetricFamily(
            "cascade_quality_decisions", "Decisions in the window.", labels=v
        ),
        "fraud": GaugeMetricFamily(
            "cascade_quality_fraud_labelled", "Decisions labelled fraud.", labels=v
        ),
        "labelled": GaugeMetricFamily(
            "cascade_quality_labelled_share",
            "Share of the window's decisions with a label.",
            labels=v,
        ),
        "delay": GaugeMetricFamily(
            "cascade_quality_label_delay_seconds",
            "Label delay (first label's reported_at - transaction time) quantiles.",
            labels=[*v, "quantile"],
        ),
        "psi": GaugeMetricFamily(
            "cascade_drift_psi",
            "Population stability index against the training reference (variable = "
            "stage1_score or a feature name).",
            labels=[*v, "variable"],
        ),
    }

    def add(name: str, labels: list[str], value: float) -> None:
        if not math.isnan(value):
            families[name].add_metric(labels, value)

    for window in report.windows:
        for q in window.versions:
            base = [window.window, q.versions.policy, q.versions.stage1, q.versions.stage2]
            add("decisions", base, q.decisions)
            add("fraud", base, q.fraud)
            add("labelled", base, q.labelled_share)
            for threshold, t in (("DECLINE", q.decline), ("REVIEW", q.review)):
                add("precision", [*base, threshold], t.precision)
                add("recall", [*base, threshold], t.recall)
            add("pr_auc", [*base, "stage1"], q.stage1_pr_auc)
            add("pr_auc", [*base, "stage2"], q.stage2_pr_auc)
            for quantile, value in q.label_delay_s.items():
                if quantile != "count":
                    add("delay", [*base, quantile], value)
            if q.drift is not None:
                add("psi", [*base, "stage1_score"], q.drift.score_psi)
                for feature, value in q.drift.feature_psi.items():
                    add("psi", [*base, feature], value)
    refreshed = GaugeMetricFamily(
        "cascade_quality_last_refresh_timestamp_seconds", "When the quality gauges were computed."
    )
    refreshed.add_metric([], report.now_ms / 1000)
    return [*families.values(), refreshed]


class QualityCollector(Collector):
    """Serves the latest report's gauges: a scrape sees one whole report, never a mix of two
    (replacing labelled Gauges one by one would show a half-updated set)."""

    def __init__(self) -> None:
        self.report: QualityReport | None = None

    def collect(self) -> Iterator[Metric]:
        """The gauges of :attr:`report` (none before the first)."""
        report = self.report
        if report is not None:
            yield from report_metrics(report)


class QualityService:
    """``cascade quality --serve``: follows both streams (from the start of the longest window)
    into one joiner and, every ``refresh_s``, evicts what left the windows, measures and hands
    the report to :attr:`collector`. A stream that does not exist yet (no label reported so far,
    or a job started before the orchestrator) reads as empty and is subscribed to at the first
    refresh that finds it. An async context manager; its refresh task is owned and cancelled on
    exit."""

    def __init__(
        self,
        url: str,
        *,
        windows_s: list[int],
        references: dict[str, DriftReference],
        refresh_s: float = 30.0,
        streams: StreamNames | None = None,
        unlabelled: Unlabelled = "genuine",
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self._url = url
        self._windows_s = windows_s
        self._refresh_s = refresh_s
        self._streams = streams or StreamNames()
        self._clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self.joiner = QualityJoiner(references=references, unlabelled=unlabelled)
        self._nc: NatsClient | None = None
        self._task: asyncio.Task[None] | None = None
        self.last_report: QualityReport | None = None
        self.collector = QualityCollector()
        """Register it (``REGISTRY.register``) to serve the gauges."""
        self.refreshed = asyncio.Event()
        """Set after each refresh (tests wait on it)."""
        self._since_ms = 0
        self._missing: list[tuple[str, Callable[[bytes, int], None], Dependency]] = []
        """Streams not found yet, retried at each refresh."""

    async def __aenter__(self) -> QualityService:
        self._since_ms = self._clock_ms() - max(self._windows_s) * 1000
        with translate_jetstream_errors(Dependency.DECISION_LOG):
            self._nc = nc = await connect_nats(self._url, name="cascade-quality-serve")
        self._missing = [
            (self._streams.decisions, _on_decision(self.joiner), Dependency.DECISION_LOG),
            (self._streams.outcomes, _on_outcome(self.joiner), Dependency.OUTCOME_LOG),
        ]
        try:
            await self._subscribe_missing()
        except BaseException:
            await nc.close()
            raise
        self._task = asyncio.create_task(self._refresh_loop(), name="quality-refresh")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()

    async def _subscribe_missing(self) -> None:
        """Follow every stream not followed yet that exists now."""
        if self._nc is None:
            return
        js = self._nc.jetstream()
        still_missing = []
        for stream, add, dependency in self._missing:
            deliver, config = _deliver_from(self._since_ms)
            with translate_jetstream_errors(dependency):
                try:
                    await js.subscribe(
                        ">",
                        stream=stream,
                        ordered_consumer=True,
                        deliver_policy=deliver,
                        config=config,
                        cb=_callback(add),
                    )
                except NotFoundError:
                    logger.info("quality: no stream %s yet; following it once it exists", stream)
                    still_missing.append((stream, add, dependency))
        self._missing = still_missing

    def refresh(self) -> QualityReport:
        """Evict, measure and export now."""
        now_ms = self._clock_ms()
        self.joiner.evict_before(now_ms - max(self._windows_s) * 1000)
        report = self.joiner.report(now_ms, self._windows_s)
        self.collector.report = report
        self.last_report = report
        self.refreshed.set()
        return report

    async def _refresh_loop(self) -> None:
        while True:
            try:
                if self._missing:
                    await self._subscribe_missing()
                self.refresh()
            except Exception:  # a bad record (or NATS away) must not stop the gauges for ever
                logger.exception("quality: refresh failed")
            await asyncio.sleep(self._refresh_s)


def _callback(add: Callable[[bytes, int], None]) -> Callable[[Msg], Awaitable[None]]:
    async def on_message(msg: Msg) -> None:
        add(msg.data, msg.metadata.sequence.stream)

    return on_message


async def serve(stop: asyncio.Event, settings: Settings | None = None) -> None:
    """The quality job's process: follow both streams and serve the gauges until ``stop``."""
    from prometheus_client import REGISTRY

    from cascade.errors import ConfigurationError
    from cascade.metrics import MetricsEndpoint
    from cascade.model_registry import load_registry
    from cascade.runtime import configure_logging

    settings = settings or Settings()
    configure_logging(settings.log_level)
    url = settings.decision_log.url or settings.nats.url
    if (settings.outcomes.url or settings.nats.url) != url:
        raise ConfigurationError("the quality job reads decisions and outcomes from one NATS")
    if settings.metrics_port is None:
        raise ConfigurationError("the quality job serves gauges: set CASCADE_METRICS_PORT")
    registry = load_registry(settings.model_dir)
    q = settings.quality
    with MetricsEndpoint(settings.metrics_port, settings.metrics_host):
        async with QualityService(
            url,
            windows_s=q.windows_s,
            references=load_references(settings.model_dir, [registry.stage1.version]),
            refresh_s=q.refresh_s,
            streams=StreamNames(settings.decision_log.stream, settings.outcomes.stream),
            unlabelled="exclude" if q.unlabelled == "exclude" else "genuine",
        ) as service:
            REGISTRY.register(service.collector)
            try:
                logger.info("quality job: serving gauges on port %d", settings.metrics_port)
                print("READY", flush=True)
                await stop.wait()
            finally:
                REGISTRY.unregister(service.collector)


def main() -> None:
    """Console entry point: ``python -m cascade.quality_job``."""
    from cascade.runtime import run_service

    run_service(serve)


if __name__ == "__main__":
    main()
