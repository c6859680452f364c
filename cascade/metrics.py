"""Prometheus metrics of the orchestrator and the screening workers, and the endpoint serving them.

The metric objects are module-level (one set per process, as Prometheus expects). Updating one
costs about a microsecond; the scoring path updates a handful per request. The endpoint is off
unless ``CASCADE_METRICS_PORT`` is set (``deploy/`` sets 9464).
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType
from typing import Final
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, Info, start_http_server

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS_S: Final = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25,
)  # fmt: skip

MODELS: Final = Info(
    "cascade_models", "The model, policy and feature-set versions this process serves."
)
SCORES: Final = Counter(
    "cascade_scores", "Answers by what decided them.", ["decided_by", "decision"]
)
DEGRADED: Final = Counter(
    "cascade_degraded_reasons", "Reason codes on degraded answers.", ["reason"]
)
INVALID: Final = Counter("cascade_invalid_requests", "Requests refused as invalid.", ["field"])
ADMISSION_SHED: Final = Counter(
    "cascade_admission_shed",
    "Score calls answered OVERLOADED on arrival, by the check that refused them: queue (waited "
    "in a standing queue), limit (the adaptive concurrency limit), budget (too little left).",
    ["cause"],
)
CALLERS_REFUSED: Final = Counter(
    "cascade_callers_refused",
    "ScoringService calls refused before scoring: unauthenticated, permission_denied, quota.",
    ["reason"],
)
STAGE_SECONDS: Final = Histogram(
    "cascade_stage_seconds",
    "Wall time per stage of the scoring path (total = the whole call).",
    ["stage"],
    buckets=_LATENCY_BUCKETS_S,
)
POST_ANSWER_WRITES: Final = Counter(
    "cascade_post_answer_writes", "Post-answer cache/history writes by outcome.", ["outcome"]
)
COALESCED_ITEMS: Final = Histogram(
    "cascade_coalesced_items",
    "Transactions per downstream request after coalescing concurrent calls, by stage.",
    ["stage"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000),
)
WORKER_BATCH_ROWS: Final = Histogram(
    "cascade_screening_batch_rows",
    "Rows per screening request (one ONNX Runtime call) in a worker.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
WORKER_REQUESTS: Final = Counter(
    "cascade_screening_requests", "Screening requests answered, by outcome.", ["outcome"]
)
BREAKER_STATE: Final = Gauge(
    "cascade_breaker_state",
    "Circuit breaker state per dependency: 0 closed, 1 half-open (probing), 2 open.",
    ["dependency"],
)
BREAKER_TRANSITIONS: Final = Counter(
    "cascade_breaker_transitions",
    "Circuit breaker state changes, by the state entered.",
    ["dependency", "state"],
)
SCREENING_HEDGES: Final = Counter(
    "cascade_screening_hedges",
    "Stage-1 hedges: sent, won (answered first), skipped (for want of tokens, or the event loop "
    "still behind once it had read its sockets again), or outrun (won, but the overtaken worker "
    "answered within the grace, so it was not suspected).",
    ["outcome"],
)
SCREENING_MEMBERS: Final = Gauge(
    "cascade_screening_members", "Screening workers known from heartbeats, by state.", ["state"]
)
SCREENING_MEMBER_SUSPECTED: Final = Counter(
    "cascade_screening_member_suspected",
    "Times a screening worker stopped answering and was routed around.",
)

DECISIONS_PUBLISHED: Final = Counter(
    "cascade_decision_log_published",
    "Decision records acknowledged by JetStream straight from the buffer.",
)
DECISIONS_DUPLICATES: Final = Counter(
    "cascade_decision_log_duplicates",
    "Acknowledgements saying JetStream already held the transaction id (a replay of a record "
    "whose first ack was lost, or a retried transaction within the dedup window).",
)
DECISIONS_SPOOLED: Final = Counter(
    "cascade_decision_log_spooled",
    "Decision records written to the local spool because JetStream did not acknowledge them.",
)
DECISIONS_REPLAYED: Final = Counter(
    "cascade_decision_log_replayed",
    "Spooled decision records acknowledged by JetStream on replay.",
)
DECISIONS_DROPPED: Final = Counter(
    "cascade_decision_log_dropped",
    "Decision records lost: buffer_full (memory buffer at its bound), spool_full (spool at "
    "spool_max_bytes), corrupt (a torn spool frame), unencodable.",
    ["reason"],
)
DECISIONS_BUFFERED: Final = Gauge(
    "cascade_decision_log_buffer_depth", "Decision records waiting in memory to be published."
)
DECISIONS_SPOOL_BYTES: Final = Gauge(
    "cascade_decision_log_spool_bytes", "Bytes of this process's decision spool on disk."
)
# Per lane while a canary runs (champion and candidate side by side; nothing is counted here
# when the champion serves alone, since the totals above are then the champion's).
LANE_ANSWERS: Final = Counter(
    "cascade_lane_answers",
    "Answers per rollout lane (role: champion or candidate; versions: policy/stage1/stage2/"
    "feature set) by what decided them, while a canary runs.",
    ["role", "versions", "decided_by", "decision"],
)
LANE_DEGRADED: Final = Counter(
    "cascade_lane_degraded_reasons",
    "Reason codes on degraded answers per rollout lane, while a canary runs.",
    ["role", "versions", "reason"],
)
LANE_SECONDS: Final = Histogram(
    "cascade_lane_seconds",
    "Wall time of the scoring path per rollout lane, while a canary runs.",
    ["role", "versions"],
    buckets=_LATENCY_BUCKETS_S,
)


class MetricsEndpoint:
    """Serves ``/metrics`` on ``host:port`` while the block runs (nothing when ``port`` is None)."""

    def __init__(self, port: int | None, host: str = "127.0.0.1") -> None:
        self._port = port
        self._host = host
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> MetricsEndpoint:
        if self._port is not None:
            self._server, self._thread = start_http_server(self._port, addr=self._host)
            logger.info("metrics on http://%s:%d/metrics", self._host, self._server.server_port)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
