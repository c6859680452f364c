"""Every setting of the cascade, read from the environment with the one prefix ``CASCADE_``.

Nested groups use ``__`` (``CASCADE_BUDGET__SLO_MS=50``). Settings are validated when built, so a
bad deployment fails at start-up, not on the first request.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from cascade.decision import Decision

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR: Final = REPO_ROOT / "models"


def split_urls(urls: str) -> list[str]:
    """``"a,b , c"`` -> ``["a", "b", "c"]``: one setting naming several servers."""
    return [part.strip() for part in urls.split(",") if part.strip()]


def check_nats_urls(urls: str, name: str) -> None:
    """ValueError unless ``urls`` names at least one server, each nats://, tls:// or ws(s)://."""
    parts = split_urls(urls)
    if not parts:
        raise ValueError(f"{name} names no server")
    for part in parts:
        if not part.startswith(("nats://", "tls://", "ws://", "wss://")):
            raise ValueError(f"{name}: each URL must start with nats://, tls://, ws:// or wss://")


def _check_pair(cert: Path | None, key: Path | None, cert_name: str, key_name: str) -> None:
    if (cert is None) != (key is None):
        raise ValueError(f"{cert_name} and {key_name} go together")


class BudgetSettings(BaseModel):
    """How the orchestrator spends a request's latency budget."""

    slo_ms: float = Field(
        50.0, gt=0, le=10_000, description="Budget when the caller sets no shorter deadline."
    )
    response_margin_ms: float = Field(
        5.0,
        ge=0,
        description="Kept back from the budget for receiving, encoding and sending the answer and "
        "for scheduling jitter (up to ~3.5 ms measured with both cores of a 2-core machine busy).",
    )
    redis_ms: float = Field(5.0, gt=0, description="Most the Redis round trip may take.")
    stage1_ms: float = Field(15.0, gt=0, description="Most the screening hop may take.")
    stage2_min_ms: float = Field(
        3.0, gt=0, description="Escalate only if at least this much budget remains for stage 2."
    )
    stage2_margin_ms: float = Field(
        2.0, ge=0, description="Kept back from stage 2's timeout to build the fallback answer."
    )
    batch_slo_ms: float = Field(
        1000.0,
        gt=0,
        le=60_000,
        description="Budget of a ScoreBatch call without a shorter deadline.",
    )
    batch_item_ms: float = Field(
        0.05,
        ge=0,
        description="Added to the Redis and stage-1 caps per transaction beyond the first of a "
        "ScoreBatch chunk, since a larger request takes longer.",
    )
    min_useful_ms: float = Field(
        1.0,
        ge=0,
        description="Below this remaining budget no stage is tried: DEFAULT answer at once.",
    )

    @model_validator(mode="after")
    def _margin_fits(self) -> BudgetSettings:
        if self.response_margin_ms >= self.slo_ms:
            raise ValueError("budget.response_margin_ms must be smaller than budget.slo_ms")
        return self


class RedisSettings(BaseModel):
    """Redis connection for the output cache and the online features."""

    url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="redis:// URL, or rediss:// for TLS (credentials via URL or the fields "
        "below, never logged); with cluster on, a comma-separated list of startup nodes "
        "(redis://h1:p1,redis://h2:p2,...), db 0.",
    )
    cluster: bool = Field(
        False,
        description="The URL names Redis Cluster nodes: the store uses redis-py's cluster client "
        "(one pipeline per node, the slot map refreshed in the background after a failover) "
        "instead of its own pipelined connections to one Redis.",
    )
    username: str | None = Field(
        None, description="ACL user to AUTH as (overrides the URL's); None: the URL's, if any."
    )
    password: SecretStr | None = Field(
        None, description="Password of the ACL user (overrides the URL's); never logged."
    )
    tls_ca_file: Path | None = Field(
        None,
        description="With a rediss:// URL: verify the server against this CA bundle instead of "
        "the system's.",
    )
    tls_cert_file: Path | None = Field(
        None, description="With a rediss:// URL: client certificate (Redis tls-auth-clients)."
    )
    tls_key_file: Path | None = Field(None, description="Key of tls_cert_file.")
    cache_ttl_s: int = Field(3600, gt=0, description="Output-cache entry lifetime.")
    feature_ttl_s: int = Field(30 * 24 * 3600, gt=0, description="Card-history lifetime.")
    connections: int = Field(
        2,
        ge=1,
        le=64,
        description="Dedicated connections per orchestrator process; each carries many "
        "pipelined requests at once, so there is no pool to run out of. (One Redis only: the "
        "cluster client keeps a pool per node.)",
    )
    write_linger_ms: float = Field(
        5.0,
        ge=0,
        le=1000,
        description="Post-answer cache and history writes wait this long for company, so that "
        "several answers share one Redis round trip (and one wake-up).",
    )

    @property
    def urls(self) -> list[str]:
        """The URL's comma-separated parts (one unless ``cluster``)."""
        return split_urls(self.url)

    @model_validator(mode="after")
    def _urls_fit_the_mode(self) -> RedisSettings:
        urls = self.urls
        if not urls:
            raise ValueError("redis.url names no server")
        for url in urls:
            if not url.startswith(("redis://", "rediss://")):
                raise ValueError("redis.url: each URL must start with redis:// or rediss://")
        if len(urls) > 1 and not self.cluster:
            raise ValueError(
                "redis.url lists several servers: set redis.cluster=true for a cluster"
            )
        _check_pair(self.tls_cert_file, self.tls_key_file, "redis.tls_cert_file", "tls_key_file")
        return self


class NatsSettings(BaseModel):
    """NATS connection and subjects for the screening stage."""

    url: str = Field(
        "nats://127.0.0.1:4222",
        description="NATS server URL (tls:// asks for TLS), or a comma-separated list of a "
        "cluster's servers (nats://h1:p1,nats://h2:p2,...): the client connects to one and "
        "moves to another when it goes away.",
    )
    subject_prefix: str = Field("cascade.screen", pattern=r"^[A-Za-z0-9_.-]+$")
    queue_group: str = Field("screening-workers", pattern=r"^[A-Za-z0-9_.-]+$")
    user: str | None = Field(
        None,
        description="User to connect as (with password); also used for the decision and "
        "outcome logs' NATS.",
    )
    password: SecretStr | None = Field(None, description="Password of user; never logged.")
    tls_ca_file: Path | None = Field(
        None,
        description="Verify the NATS server against this CA bundle (turns TLS on, as does a "
        "tls:// URL, which alone uses the system's CAs).",
    )
    tls_cert_file: Path | None = Field(
        None, description="Client certificate, for a nats-server run with --tlsverify."
    )
    tls_key_file: Path | None = Field(None, description="Key of tls_cert_file.")
    tls_handshake_first: bool = Field(
        False,
        description="TLS from the first byte, before NATS's INFO (the server's tls "
        "{ handshake_first: true }, nats-server 2.10.4+): a man in the middle cannot strip "
        "INFO's tls_required and read the password; a plain INFO-first server is refused.",
    )

    @model_validator(mode="after")
    def _credentials_complete(self) -> NatsSettings:
        if (self.user is None) != (self.password is None):
            raise ValueError("nats.user and nats.password go together")
        _check_pair(self.tls_cert_file, self.tls_key_file, "nats.tls_cert_file", "tls_key_file")
        return self

    @model_validator(mode="after")
    def _urls_named(self) -> NatsSettings:
        check_nats_urls(self.url, "nats.url")
        return self


class TritonSettings(BaseModel):
    """Triton endpoint for the heavyweight stage."""

    url: str = Field("127.0.0.1:8001", description="Triton gRPC host:port.")
    # The model's name and version come from models/registry.json, which versions them together.


class ScreeningSettings(BaseModel):
    """The screening workers' ONNX Runtime."""

    intra_op_threads: int = Field(1, ge=1, le=64, description="ONNX Runtime threads per worker.")


class RolloutSettings(BaseModel):
    """The canary: which share of cards the registry's candidate scores, and how a running
    process follows changes of ``registry.json`` (``docs/rollout.md``)."""

    canary_share: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Share of cards (sticky, by a hash of the card id) scored by the registry's "
        "candidate versions; 0 (the default) serves the champion alone, whatever the registry "
        "holds.",
    )
    reload_interval_s: float = Field(
        1.0,
        gt=0.0,
        le=60.0,
        description="How often orchestrators and workers look whether registry.json changed "
        "(one stat call); a change is served without a restart.",
    )
    retire_grace_s: float = Field(
        10.0,
        ge=0.0,
        le=600.0,
        description="A screening worker keeps answering a stage-1 version the registry no "
        "longer names this long, so orchestrators still on it can switch first.",
    )
    switch_timeout_s: float = Field(
        30.0,
        gt=0.0,
        le=600.0,
        description="How long an orchestrator waits for a changed registry's models to answer "
        "before it gives up on the change (and keeps serving what it served).",
    )


class CoalescingSettings(BaseModel):
    """How the orchestrator merges concurrent calls' work into shared downstream requests."""

    enabled: bool = Field(
        True,
        description="Merge the Redis lookups, stage-1 rows and stage-2 sequences of calls that "
        "reach a stage in the same event-loop pass into one request each.",
    )
    max_items: int = Field(
        64,
        ge=1,
        le=1000,
        description="Most transactions in one merged request of concurrent Score calls.",
    )
    batch_chunk_items: int = Field(
        16,
        ge=1,
        le=1000,
        description="A ScoreBatch is scored this many transactions at a time, one chunk after "
        "the other, so it never holds the event loop, a worker or Redis long enough to make a "
        "concurrent Score call late (a chunk of 64 blocked the loop for ~7 ms).",
    )
    batch_stage2_items: int = Field(
        8,
        ge=1,
        le=1000,
        description="Most sequences per stage-2 request from a ScoreBatch chunk, sent one after "
        "the other: a live call's escalation waits behind at most one of them in Triton.",
    )
    batch_defers: bool = Field(
        True,
        description="Between two chunks a ScoreBatch pauses while live Score calls are about "
        "(in flight, or one arrived during the chunk), so they have the stack to themselves: "
        "see batch_share; only while the chunks left still fit the batch's budget.",
    )
    batch_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="While live Score calls are about, a ScoreBatch works at most this share "
        "of the time: after a chunk that took t it pauses t * (1 - share) / share (1: never).",
    )


class BreakerSettings(BaseModel):
    """Circuit breakers per dependency (Redis, stage 1, stage 2): see ``orchestrator/breaker.py``."""

    enabled: bool = Field(True, description="Off: every dependency is always attempted.")
    window: int = Field(20, ge=1, le=10_000, description="Outcomes the failure ratio is over.")
    window_s: float = Field(
        5.0, gt=0, description="Outcomes older than this leave the window whatever their number."
    )
    min_calls: int = Field(
        10, ge=1, description="No trip before this many outcomes are in the window."
    )
    failure_ratio: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Trip when at least this share of the window failed. High on purpose: with "
        "one of two workers stalled half the calls fail, and hedging, not the breaker, is the "
        "answer to that.",
    )
    open_s: float = Field(
        0.1, gt=0, description="How long an open breaker skips the dependency before a probe."
    )
    max_open_s: float = Field(
        0.5,
        gt=0,
        description="Each failed probe doubles the open time up to this; it bounds how long a "
        "recovered dependency goes unused (the target is useful answers within 1 s).",
    )

    @model_validator(mode="after")
    def _open_times_ordered(self) -> BreakerSettings:
        if self.open_s > self.max_open_s:
            raise ValueError("breaker.open_s must not exceed breaker.max_open_s")
        if self.min_calls > self.window:
            raise ValueError("breaker.min_calls must not exceed breaker.window")
        return self


class HedgingSettings(BaseModel):
    """Stage-1 routing around stalled workers: direct requests and budgeted hedges."""

    enabled: bool = Field(
        True,
        description="Route each screening request to a live worker's own subject, mark a worker "
        "that stops answering, and hedge a request that is later than recent answers. Off: every "
        "request goes to the queue group and waits for whichever member NATS picked.",
    )
    heartbeat_s: float = Field(
        0.25, gt=0, description="How often each worker announces itself on the members subject."
    )
    member_ttl_s: float = Field(
        1.0,
        gt=0,
        description="A worker not heard from for this long is no longer routed to (a stalled "
        "process sends no heartbeats).",
    )
    quantile: float = Field(
        0.95, gt=0, lt=1, description="Hedge once a request is later than this quantile."
    )
    min_delay_ms: float = Field(
        1.0, ge=0, description="Never hedge earlier than this, however fast recent answers were."
    )
    initial_delay_ms: float = Field(
        5.0,
        ge=0,
        description="The hedge delay until enough answers were seen to know the quantile (a "
        "fresh process's first answers are slow, and hedging them would only spend the budget).",
    )
    ratio: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Hedges earned per request (token bucket), so hedging adds at most this "
        "share of load when everything is slow.",
    )
    burst: float = Field(10.0, ge=1, description="Hedges that may be spent at once.")
    min_left_ms: float = Field(
        1.0, ge=0, description="Hedge only if at least this much of the stage-1 time is left."
    )
    routing: Literal["pack", "round_robin"] = Field(
        "round_robin",
        description="round_robin: every live worker in turn. pack (opt-in): the first worker in "
        "this process's preference order (rendezvous hashing, salted per process) with fewer "
        "than pack_in_flight of our requests in flight and no copy a hedge overtook, else the "
        "least busy; it keeps one worker warm at moderate rates (docs/latency.md, eighth run: "
        "8-29% less screening CPU per answer at 300/s; why it is not the default yet).",
    )
    pack_in_flight: int = Field(
        2,
        ge=1,
        le=1000,
        description="routing=pack: a worker with this many of our requests in flight is passed "
        "over for the next one in order (1 sent a quarter of the requests at 300/s to the cold "
        "spare; 4 shed more than round robin from 1,000/s up).",
    )
    overtaken_grace_ms: float = Field(
        5.0,
        ge=0,
        description="A worker whose request a hedge overtook is routed around only if its own "
        "answer has not come this long after the hedge's: a busy worker that merely lost the race "
        "answers a moment later, a stalled one never does.",
    )

    @model_validator(mode="after")
    def _ttl_covers_heartbeats(self) -> HedgingSettings:
        if self.member_ttl_s < 2 * self.heartbeat_s:
            raise ValueError("hedging.member_ttl_s must be at least twice hedging.heartbeat_s")
        return self


class AdmissionSettings(BaseModel):
    """Admission control: shed at once what cannot be answered in time."""

    enabled: bool = Field(True, description="Off: every call is admitted (for A/B measurements).")
    # One event loop does the CPU work of about 2-4 calls in the time one call takes end to end
    # (measured: ~1.2 ms of CPU per answer, ~2-3 ms per call); more in flight only queues.
    initial_limit: int = Field(8, ge=1, description="Concurrency limit before any measurement.")
    min_limit: int = Field(2, ge=1, description="The adaptive limit never goes below this.")
    max_limit: int = Field(64, ge=1, description="The adaptive limit never goes above this.")
    min_budget_ms: float = Field(
        5.0,
        ge=0,
        description="A call arriving with less of its budget left than this waited in queues "
        "for the rest: it is shed at once.",
    )
    max_queue_ms: float = Field(
        2.0,
        gt=0,
        description="Once calls stand in a queue in front of the handler (the least-waiting call "
        "of an interval waited longer than this), calls that waited longer are shed.",
    )
    queue_interval_ms: float = Field(
        20.0, gt=0, description="The interval over which a standing queue is recognised."
    )
    queue_intervals: int = Field(
        1,
        ge=1,
        le=100,
        description="Intervals in a row that must each hold a standing queue before calls are "
        "shed: a burst that drains within fewer is not one.",
    )
    queue_min_arrivals: int = Field(
        8,
        ge=1,
        description="Calls an interval must hold before their waits are believed to be a queue.",
    )
    rtt_tolerance: float = Field(
        2.0,
        ge=1.0,
        description="How much slower than the long-run service time calls may get before the "
        "limit shrinks (Gradient2's tolerance).",
    )
    stage2_max_in_flight: int = Field(
        128,
        ge=1,
        description="Most sequences in flight to stage 2; escalations beyond it get the stage-1 "
        "answer labelled STAGE2_OVERLOADED.",
    )

    @model_validator(mode="after")
    def _limits_ordered(self) -> AdmissionSettings:
        if not self.min_limit <= self.initial_limit <= self.max_limit:
            raise ValueError("admission needs min_limit <= initial_limit <= max_limit")
        return self


class DecisionLogSettings(BaseModel):
    """The decision log: every answer published to a JetStream stream, off the request path
    (``orchestrator/decision_log.py``, ``docs/decision_log.md``)."""

    enabled: bool = Field(
        True, description="Publish every answer to the stream (off: nothing is recorded)."
    )
    url: str | None = Field(
        None,
        description="NATS (with JetStream) for the log; None: the screening NATS (nats.url).",
    )
    stream: str = Field(
        "DECISIONS",
        pattern=r"^[A-Za-z0-9_-]+$",
        description="JetStream stream the orchestrator creates or updates at start-up.",
    )
    subject_prefix: str = Field(
        "decisions",
        pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$",
        description="Records go to <prefix>.<policy version>; the stream holds <prefix>.>.",
    )
    dedup_window_s: float = Field(
        900.0,
        gt=0,
        description="JetStream's duplicate window: a record published again (a replay after a "
        "lost ack, a retried transaction) with the same transaction id within it is stored once. "
        "It should cover the longest outage the spool is expected to bridge.",
    )
    stream_max_age_s: float = Field(
        30 * 24 * 3600.0, gt=0, description="Records older than this leave the stream."
    )
    stream_max_bytes: int = Field(
        8 * 1024**3,
        ge=-1,
        description="The stream's size limit (-1: none); past it the oldest records are dropped.",
    )
    stream_replicas: int = Field(1, ge=1, le=5, description="Stream replicas (a cluster: 3).")
    buffer_max_records: int = Field(
        100_000,
        ge=1,
        description="Answers waiting in memory for the background publisher; past it new ones "
        "are dropped and counted (cascade_decision_log_dropped_total{reason=buffer_full}).",
    )
    batch_max_records: int = Field(
        512, ge=1, le=100_000, description="Most records published (or spooled) per batch."
    )
    batch_interval_ms: float = Field(
        20.0,
        ge=0,
        le=10_000,
        description="A batch is sent this long after its first record arrived, so that one "
        "wake-up and one socket write carry many records.",
    )
    ack_timeout_s: float = Field(
        2.0,
        gt=0,
        description="A batch's records not acknowledged by JetStream within this go to the spool.",
    )
    retry_interval_s: float = Field(
        0.5, gt=0, description="While JetStream fails, how often a spool replay is tried."
    )
    replay_batch_records: int = Field(
        1000, ge=1, le=100_000, description="Records per replay batch from the spool."
    )
    spool_dir: Path = Field(
        REPO_ROOT / ".run" / "decision-spool",
        description="Where unacknowledged records wait on disk (one slot folder per process).",
    )
    spool_max_bytes: int = Field(
        1024**3,
        gt=0,
        description="Most bytes one process spools; past it new records are dropped and "
        "counted (cascade_decision_log_dropped_total{reason=spool_full}) and logged.",
    )
    spool_segment_bytes: int = Field(
        8 * 1024**2, gt=0, description="A spool segment file is closed at this size."
    )
    flush_timeout_s: float = Field(
        3.0,
        ge=0,
        description="At shutdown, how long the buffer may take to reach JetStream; what is "
        "left then goes to the spool.",
    )

    @model_validator(mode="after")
    def _window_fits(self) -> DecisionLogSettings:
        if self.url is not None:
            check_nats_urls(self.url, "decision_log.url")
        if self.dedup_window_s > self.stream_max_age_s:
            raise ValueError("decision_log.dedup_window_s must not exceed stream_max_age_s")
        if self.batch_max_records > self.buffer_max_records:
            raise ValueError("decision_log.batch_max_records must not exceed buffer_max_records")
        return self


class OutcomeSettings(BaseModel):
    """Labels reported back (``ReportOutcome``, ``cascade outcomes import``): the JetStream
    stream they are stored on (``cascade/outcome_store.py``, ``docs/quality.md``)."""

    enabled: bool = Field(
        True, description="Serve ReportOutcome (off: it answers UNAVAILABLE, nothing is stored)."
    )
    url: str | None = Field(
        None,
        description="NATS (with JetStream) for outcomes; None: the screening NATS (nats.url).",
    )
    stream: str = Field(
        "OUTCOMES", pattern=r"^[A-Za-z0-9_-]+$", description="JetStream stream of the labels."
    )
    subject_prefix: str = Field(
        "outcomes",
        pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$",
        description="Labels go to <prefix>.<label kind>; the stream holds <prefix>.>.",
    )
    dedup_window_s: float = Field(
        7 * 24 * 3600.0,
        gt=0,
        description="A label sent again (a retried call, a file imported twice) with the same "
        "transaction id and kind within this is stored once; the joiner also keeps one per pair.",
    )
    stream_max_age_s: float = Field(
        400 * 24 * 3600.0,
        gt=0,
        description="Labels older than this leave the stream (chargebacks come up to ~120 days).",
    )
    stream_replicas: int = Field(1, ge=1, le=5, description="Stream replicas (a cluster: 3).")
    ack_timeout_s: float = Field(
        2.0, gt=0, description="Most ReportOutcome waits for JetStream to store a label."
    )

    @model_validator(mode="after")
    def _window_fits(self) -> OutcomeSettings:
        if self.url is not None:
            check_nats_urls(self.url, "outcomes.url")
        if self.dedup_window_s > self.stream_max_age_s:
            raise ValueError("outcomes.dedup_window_s must not exceed stream_max_age_s")
        return self


class ServerTlsSettings(BaseModel):
    """TLS on the orchestrator's gRPC port (health and reflection included). The files are
    read again when they change (checked at each new connection): renew them in place, no
    restart needed."""

    cert_file: Path | None = Field(
        None, description="Server certificate chain (PEM); with key_file, the port speaks TLS."
    )
    key_file: Path | None = Field(None, description="Private key of cert_file (PEM).")
    client_ca_file: Path | None = Field(
        None,
        description="Mutual TLS: every connection must present a client certificate signed by "
        "this CA bundle (refused in the handshake otherwise; probes need one too), and a call's "
        "caller is the certificate's common name (else its first subject alternative name). "
        "gRPC Python cannot ask for an optional client certificate: without this, callers "
        "identify themselves with bearer tokens.",
    )

    @property
    def enabled(self) -> bool:
        """Whether the port speaks TLS."""
        return self.cert_file is not None

    @model_validator(mode="after")
    def _complete(self) -> ServerTlsSettings:
        _check_pair(self.cert_file, self.key_file, "server.tls.cert_file", "key_file")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("server.tls.client_ca_file needs server.tls.cert_file (TLS)")
        return self


ScoringMethod = Literal["Score", "ScoreBatch", "ReportOutcome"]
SCORING_METHODS: Final[tuple[ScoringMethod, ...]] = ("Score", "ScoreBatch", "ReportOutcome")


class CallerLimits(BaseModel):
    """What one caller may do: which methods, how fast, how many calls at once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    methods: tuple[ScoringMethod, ...] = Field(
        SCORING_METHODS,
        description="ScoringService methods the caller may call; others are PERMISSION_DENIED.",
    )
    rate_per_s: float | None = Field(
        None,
        gt=0,
        description="Calls per second on average (a token bucket); None: no rate limit. Past "
        "it calls are RESOURCE_EXHAUSTED with a retry-after-ms hint.",
    )
    burst: float | None = Field(
        None,
        ge=1,
        description="Calls the bucket holds (may be spent at once); None: one second's worth "
        "of rate_per_s (at least 1).",
    )
    max_concurrent: int | None = Field(
        None, ge=1, description="Calls in flight at once; None: no limit."
    )

    @property
    def limited(self) -> bool:
        """Whether any quota applies."""
        return self.rate_per_s is not None or self.max_concurrent is not None


class CallerSettings(CallerLimits):
    """One named caller: how it proves who it is (a client certificate naming it, or a bearer
    token whose SHA-256 is listed here) and its limits."""

    token_sha256: tuple[str, ...] = Field(
        (),
        description="Hex SHA-256 digests of the bearer tokens that identify this caller "
        "(`authorization: Bearer <token>` metadata); the tokens themselves are never stored.",
    )

    @model_validator(mode="after")
    def _digests(self) -> CallerSettings:
        for digest in self.token_sha256:
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError("token_sha256 entries must be 64 lower-case hex digits")
        return self


class AuthSettings(BaseModel):
    """Who may call ``ScoringService`` and how much (health and reflection stay open)."""

    required: bool = Field(
        False,
        description="Every ScoringService call must name its caller (a client certificate, or a "
        "known bearer token): UNAUTHENTICATED otherwise. Off: anonymous calls get `default`.",
    )
    callers: dict[str, CallerSettings] = Field(
        default_factory=dict,
        description="Named callers (JSON in CASCADE_AUTH__CALLERS), by identity: a client "
        "certificate's name, or the name its tokens map to.",
    )
    callers_file: Path | None = Field(
        None,
        description="JSON file with more named callers, same shape as callers (where token "
        "digests are best kept, outside the environment).",
    )
    default: CallerLimits = Field(
        default_factory=CallerLimits,
        description="Limits of anonymous callers (together) and of certificate identities that "
        "callers does not name (each on its own).",
    )

    @model_validator(mode="after")
    def _callers_file_readable(self) -> AuthSettings:
        self.file_callers()
        return self

    def file_callers(self) -> dict[str, CallerSettings]:
        """The callers named in ``callers_file`` (empty without one); ValueError when the file
        cannot be read or a name is also in ``callers``."""
        if self.callers_file is None:
            return {}
        try:
            raw = json.loads(self.callers_file.read_text())
            parsed = {str(k): CallerSettings.model_validate(v) for k, v in dict(raw).items()}
        except (OSError, ValueError, TypeError, ValidationError) as exc:
            raise ValueError(f"auth.callers_file {self.callers_file}: {exc}") from exc
        both = sorted(set(parsed) & set(self.callers))
        if both:
            raise ValueError(f"auth.callers_file names callers already in auth.callers: {both}")
        return parsed

    def all_callers(self) -> dict[str, CallerSettings]:
        """``callers`` and those of ``callers_file`` together."""
        return {**self.callers, **self.file_callers()}


class QualitySettings(BaseModel):
    """The quality job (``python -m cascade.quality_job``): live precision, recall, PR-AUC and
    drift per version, served as Prometheus gauges on ``metrics_port`` (``docs/quality.md``)."""

    windows_s: list[int] = Field(
        default_factory=lambda: [3600, 86400, 7 * 86400],
        min_length=1,
        description="Sliding windows of decision time, seconds (JSON list: [3600,86400]).",
    )
    refresh_s: float = Field(30.0, gt=0, description="How often the gauges are recomputed.")
    unlabelled: str = Field(
        "genuine",
        pattern=r"^(genuine|exclude)$",
        description="Decisions without a label count as genuine, or are left out.",
    )

    @model_validator(mode="after")
    def _positive_windows(self) -> QualitySettings:
        if any(w <= 0 for w in self.windows_s):
            raise ValueError("quality.windows_s must be positive seconds")
        return self


_KEY_ID: Final = r"^[A-Za-z0-9_-]{1,16}$"


class PseudonymSettings(BaseModel):
    """The keyed hash that stands in for card and device ids everywhere they are kept
    (:mod:`cascade.pseudonym`): Redis keys and history entries, the decision log, spans, logs.

    The orchestrator refuses to start without a key (``cascade up`` generates one per run
    dir). A rotation names the new key as ``key`` and the old one as ``previous_key`` for as long
    as the card-history TTL, then drops ``previous_key`` (deploy/README.md).
    """

    key: SecretStr | None = Field(
        None,
        description="The current HMAC key (at least 32 characters; never logged). Exactly one "
        "of key and key_file must be set where ids are pseudonymized.",
    )
    key_file: Path | None = Field(
        None, description="A file holding the current key (surrounding whitespace ignored)."
    )
    key_id: str = Field(
        "k1",
        pattern=_KEY_ID,
        description="The current key's version, the first part of every token "
        "(k1.<hmac>): a new key needs a new id, so every Redis key it names is new.",
    )
    previous_key: SecretStr | None = Field(
        None,
        description="While rotating: the key before the current one. Card histories not yet "
        "written under the current key are read (and copied over) under it.",
    )
    previous_key_file: Path | None = Field(
        None, description="A file holding the previous key (instead of previous_key)."
    )
    previous_key_id: str | None = Field(
        None, pattern=_KEY_ID, description="The previous key's version (set with the key)."
    )

    @field_validator("key", "previous_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # A compose file passes ${CASCADE_PSEUDONYM__KEY:-} through as "" when it is not set.
        if value == "" or (isinstance(value, SecretStr) and not value.get_secret_value()):
            return None
        return value

    @model_validator(mode="after")
    def _keys_consistent(self) -> PseudonymSettings:
        if self.key is not None and self.key_file is not None:
            raise ValueError("pseudonym: set key or key_file, not both")
        if self.previous_key is not None and self.previous_key_file is not None:
            raise ValueError("pseudonym: set previous_key or previous_key_file, not both")
        has_previous = self.previous_key is not None or self.previous_key_file is not None
        if has_previous != (self.previous_key_id is not None):
            raise ValueError("pseudonym: previous_key_id goes with previous_key (or its file)")
        if has_previous and self.key is None and self.key_file is None:
            raise ValueError("pseudonym: a previous key needs a current key")
        if self.previous_key_id == self.key_id:
            raise ValueError("pseudonym: previous_key_id must differ from key_id")
        return self


class ServerSettings(BaseModel):
    """The orchestrator's own gRPC server."""

    host: str = Field("127.0.0.1")
    port: int = Field(50051, ge=0, le=65535)
    max_message_bytes: int = Field(
        1024 * 1024, gt=0, description="Largest request accepted (a full ScoreBatch fits)."
    )
    shutdown_delay_s: float = Field(
        0.5,
        ge=0,
        description="On SIGTERM, keep accepting calls this long after health turns NOT_SERVING, "
        "so load balancers (and calls already on the wire) see the change before we stop.",
    )
    drain_s: float = Field(5.0, ge=0, description="Grace period for in-flight calls on SIGTERM.")
    health_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Also serve grpc.health.v1 (and nothing else: no scoring, no reflection) "
        "in plaintext on this port, for probes that cannot do TLS or present a client "
        "certificate (Kubernetes' gRPC probes). The same health status as the main port. "
        "None: health on the main port only.",
    )
    reuse_port: bool = Field(
        False,
        description="Bind with SO_REUSEPORT, so several orchestrator processes share one port "
        "(the kernel spreads new connections over them). Off for a single process, so that a "
        "port another server holds is an error at start-up rather than silently shared.",
    )
    processes: int = Field(
        1,
        ge=1,
        le=256,
        description="Orchestrator processes on the one port. Above 1, `python -m orchestrator` "
        "only supervises: it starts this many children with reuse_port on (child i serves "
        "metrics on metrics_port + i), forwards SIGTERM so all drain, and exits non-zero if "
        "one dies. `cascade up --orchestrators N` starts its N processes itself.",
    )
    tls: ServerTlsSettings = Field(default_factory=ServerTlsSettings)


class Settings(BaseSettings):
    """All settings; build with ``Settings()`` to read ``CASCADE_*`` from the environment."""

    model_config = SettingsConfigDict(
        env_prefix="CASCADE_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    model_dir: Path = Field(
        DEFAULT_MODEL_DIR, description="Folder holding registry.json and artifacts."
    )
    policy_file: Path | None = Field(
        None, description="Policy JSON; default: the one registry.json names."
    )
    default_decision: Decision = Field(
        Decision.REVIEW, description="Answer when no model could score in time."
    )
    budget: BudgetSettings = Field(default_factory=BudgetSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    nats: NatsSettings = Field(default_factory=NatsSettings)
    triton: TritonSettings = Field(default_factory=TritonSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    screening: ScreeningSettings = Field(default_factory=ScreeningSettings)
    coalescing: CoalescingSettings = Field(default_factory=CoalescingSettings)
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    hedging: HedgingSettings = Field(default_factory=HedgingSettings)
    decision_log: DecisionLogSettings = Field(default_factory=DecisionLogSettings)
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    outcomes: OutcomeSettings = Field(default_factory=OutcomeSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    quality: QualitySettings = Field(default_factory=QualitySettings)
    pseudonym: PseudonymSettings = Field(default_factory=PseudonymSettings)
    gc_freeze: bool = Field(
        True, description="gc.freeze() after warm-up, so collections skip start-up objects."
    )
    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Serve Prometheus /metrics here (None: off)."
    )
    metrics_host: str = Field("127.0.0.1", description="Address the metrics endpoint binds.")

    @model_validator(mode="after")
    def _callers_can_authenticate(self) -> Settings:
        tokens = any(c.token_sha256 for c in self.auth.all_callers().values())
        if self.auth.required and self.server.tls.client_ca_file is None and not tokens:
            raise ValueError(
                "auth.required, but no caller can authenticate: set "
                "server.tls.client_ca_file or give a caller token_sha256"
            )
        return self
