"""``cascade``: run the local stack and send it sample transactions.

* ``cascade up``    start Redis, NATS, Triton, screening workers and the orchestrator processes on
                    loopback (one per two cores, on one port), wait until healthy, print the endpoint,
                    optionally send sample traffic, and run until SIGINT/SIGTERM, restarting any
                    process that exits on its own (printed, and counted); then stop everything it
                    started.
* ``cascade score`` send sample transactions to a running stack and print the answers as a table.
* ``cascade trace`` print one stored trace (``cascade up --traces``) as a waterfall.
* ``cascade decisions`` tail, filter and export the decision log (JetStream stream DECISIONS) as
                    a table, JSON Lines or Parquet.
* ``cascade outcomes import``, ``cascade quality``: the label loop (``devstack/quality_cli.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Final

import grpc
from prometheus_client import start_http_server

from cascade.cpu_latency import CpuLatencyHold
from cascade.errors import ConfigurationError, DependencyError
from cascade.iso_codes import minor_unit_exponent, to_major_units
from cascade.pseudonym import from_settings as pseudonym_from_settings
from cascade.settings import DEFAULT_MODEL_DIR, REPO_ROOT, Settings
from cascade.shared_port import local_stack_orchestrators
from cascade.v1 import scoring_pb2, scoring_pb2_grpc
from devstack.decision_rows import DecisionFilter, parse_time_ms
from devstack.decisions import read_decision_rows, table_line, write_jsonl, write_parquet
from devstack.otlp_receiver import SPANS_FILE, read_trace, wait_for_services
from devstack.quality_cli import add_quality_commands, run_outcomes, run_quality
from devstack.rollout_cli import add_arguments as add_rollout_arguments
from devstack.rollout_cli import run as run_rollout
from devstack.samples import labelled_sample
from devstack.servers import port_is_free
from devstack.stack import (
    PSEUDONYM_KEY_FILE,
    ClientTls,
    LocalStack,
    StackConfig,
    StackPorts,
    scoring_channel,
)
from devstack.stack_settings import (
    SettingsInputError,
    check_settings,
    non_negative_int,
    parse_assignments,
    parse_env_file,
    positive_int,
)
from devstack.supervision import STACK_METRICS, RestartEvent
from devstack.trace_view import waterfall

logger = logging.getLogger("cascade")

_BACKFILL_BATCH: Final = 500
_TRACE_SETTLE_S: Final = 1.0
_TRACE_SETTLE_MAX_S: Final = 10.0
_TRACE_ID: Final = re.compile(r"\b[0-9a-f]{32}\b")
_PORT_FLAGS: Final = (
    "--port",
    "--redis-port",
    "--nats-port",
    "--triton-grpc-port",
    "--triton-http-port",
    "--triton-metrics-port",
)
_HISTORY_SETTLE_S: Final = 0.5


def _sample_services(lines: Sequence[str]) -> dict[str, set[str]]:
    """The services whose spans each sample row's trace must have: the orchestrator's, and
    Triton's where stage 2 decided."""
    wanted: dict[str, set[str]] = {}
    for line in lines:
        match = _TRACE_ID.search(line) if line.startswith("tx-") else None
        if match is not None:
            services = {"cascade-orchestrator"}
            if " STAGE2 " in line:
                services.add("triton")
            wanted[match.group(0)] = services
    return wanted


async def score_samples(
    target: str,
    count: int,
    seed: int,
    deadline_ms: float,
    *,
    history: bool = True,
    tls: ClientTls | None = None,
    token: str | None = None,
) -> list[str]:
    """Score ``count`` sample transactions against ``target``; return the table's lines.

    With ``history``, the sampled cards' earlier transactions are sent first (``ScoreBatch``).
    With ``tls`` the channel is TLS (mutual, when it names a client certificate); a ``token``
    goes with every call as ``authorization: Bearer``.
    """
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    header = (
        f"{'transaction':<24} {'card':<12} {'amount':>14} {'decision':<8} {'score':>6} "
        f"{'by':<7} {'esc':<3} {'ms':>6} {'redis':>6} {'s1':>6} {'s2':>6}  {'truth':<20} "
        f"{'trace':<32} reasons"
    )
    sample = labelled_sample(count, seed=seed)
    lines: list[str] = []
    async with scoring_channel(target, tls) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        if history:
            # The cards' earlier transactions, in order, in a few ScoreBatch calls: the features
            # then see the history a running deployment would have for these cards.
            for i in range(0, len(sample.history), _BACKFILL_BATCH):
                chunk = sample.history[i : i + _BACKFILL_BATCH]
                await stub.ScoreBatch(
                    scoring_pb2.ScoreBatchRequest(transactions=chunk),
                    timeout=30,
                    metadata=metadata,
                )
            lines.append(
                f"(sent {len(sample.history)} earlier transactions of these cards with ScoreBatch)"
            )
            # History is written after the answers go out; give those writes a moment to land.
            await asyncio.sleep(_HISTORY_SETTLE_S)
        lines += [header, "-" * len(header)]
        for tx, truth in sample.labelled:
            start = time.perf_counter()
            try:
                reply = await stub.Score(
                    scoring_pb2.ScoreRequest(transaction=tx),
                    timeout=deadline_ms / 1000,
                    metadata=metadata,
                )
            except grpc.aio.AioRpcError as exc:
                lines.append(f"{tx.transaction_id:<24} error {exc.code().name}: {exc.details()}")
                continue
            elapsed_ms = (time.perf_counter() - start) * 1000
            t = reply.timings
            reasons = ",".join(
                scoring_pb2.Reason.Name(r).removeprefix("REASON_") for r in reply.reasons
            )
            major = to_major_units(tx.amount_minor, tx.currency)
            amount = f"{major:,.{minor_unit_exponent(tx.currency)}f} {tx.currency}"
            lines.append(
                f"{tx.transaction_id:<24} {tx.card_id:<12} {amount:>14} "
                f"{scoring_pb2.Decision.Name(reply.decision).removeprefix('DECISION_'):<8} "
                f"{reply.score:6.4f} "
                f"{scoring_pb2.DecidedBy.Name(reply.decided_by).removeprefix('DECIDED_BY_'):<7} "
                f"{'yes' if reply.escalated else '':<3} {elapsed_ms:6.2f} "
                f"{t.redis_us / 1000:6.2f} {t.stage1_us / 1000:6.2f} {t.stage2_us / 1000:6.2f}  "
                f"{truth or '-':<20} {reply.trace_id or '-':<32} {reasons}"
            )
    return lines


def _busy_port(args: argparse.Namespace) -> str | None:
    """A one-line complaint about the first fixed port that is taken, or None."""
    for flag in _PORT_FLAGS:
        if args.cluster and flag in ("--redis-port", "--nats-port"):
            continue  # the clusters' nodes take free ports
        port = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if port and not port_is_free(port):
            return f"port {port} is in use; choose another with {flag} (0 picks a free one)"
    return None


def _service_settings(args: argparse.Namespace) -> dict[str, str]:
    """What ``--env-file`` and ``--set`` pass to the services, checked against the settings
    model together with the environment's ``CASCADE_*``; SettingsInputError names the problem."""
    extra: dict[str, str] = {}
    for path in args.env_file:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SettingsInputError(f"--env-file {path}: {exc.strerror}") from None
        extra |= parse_env_file(text, name=str(path))
    extra |= parse_assignments(args.set)
    check_settings({**os.environ, **extra})
    return extra


def restart_line(event: RestartEvent) -> str:
    """What ``cascade up`` prints when the supervisor restarted a process."""
    what = (
        "back"
        if event.ready_at is not None
        else f"restart failed ({event.error}); retrying with backoff"
    )
    return (
        f"{event.child} exited with status {event.exit_status}: restart #{event.restart_number} "
        f"after {event.delay_s:.2f} s, {what}"
    )


def restart_summary(restarts: Mapping[str, int]) -> str:
    """The restart counter, one entry per process that was restarted."""
    if not restarts:
        return "restarts: none"
    return "restarts: " + ", ".join(f"{name} {n}" for name, n in sorted(restarts.items()))


async def _up(args: argparse.Namespace) -> int:
    if args.cluster and args.tls:
        # The local clusters' nodes start without certificates or credentials (deploy/README.md
        # says how a real cluster is secured); refusing beats a stack that looks secure.
        print("cascade up: --cluster and --tls are not combined (yet)", file=sys.stderr)
        return 2
    busy = _busy_port(args)
    if busy is not None:
        print(f"cascade up: {busy}", file=sys.stderr)
        return 2
    try:
        extra_env = _service_settings(args)
    except SettingsInputError as exc:
        print(f"cascade up: {exc}", file=sys.stderr)
        return 2
    config = StackConfig(
        model_dir=args.model_dir.resolve(),
        run_dir=args.run_dir.resolve(),
        ports=StackPorts(
            grpc=args.port,
            redis=args.redis_port,
            nats=args.nats_port,
            triton_grpc=args.triton_grpc_port,
            triton_http=args.triton_http_port,
            triton_metrics=args.triton_metrics_port,
        ),
        workers=args.workers,
        orchestrators=args.orchestrators,
        cluster=args.cluster,
        traces_dir=args.run_dir.resolve() / "traces" if args.traces else None,
        extra_env=extra_env,
        tls=args.tls,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"starting the local stack (logs in {config.run_dir / 'logs'}) ...", flush=True)
    started = time.monotonic()

    def report(event: RestartEvent) -> None:
        print(restart_line(event), flush=True)

    async with AsyncExitStack() as exits:
        if args.cpu_latency_us is not None:
            hold = exits.enter_context(CpuLatencyHold(args.cpu_latency_us))
            if not hold.held:
                print(f"cascade up: --cpu-latency-us: {hold.problem}", file=sys.stderr)
                return 2
            print(
                f"  cores kept out of deep idle while the stack runs (cpu_dma_latency "
                f"{args.cpu_latency_us} us)",
                flush=True,
            )
        if args.supervisor_metrics_port is not None:
            server, _ = start_http_server(
                args.supervisor_metrics_port, addr="127.0.0.1", registry=STACK_METRICS
            )
            exits.callback(server.shutdown)
            print(
                f"  supervisor metrics on http://127.0.0.1:{server.server_port}/metrics",
                flush=True,
            )
        stack = await exits.enter_async_context(LocalStack(config, on_restart=report))
        scheme = "grpcs" if config.tls else "grpc"
        print(
            f"stack healthy in {time.monotonic() - started:.1f}s\n"
            f"  scoring endpoint  {scheme}://{stack.target}  (cascade.v1.ScoringService/Score, "
            f"{config.orchestrators} orchestrator process{'es' if config.orchestrators > 1 else ''})\n"
            f"  redis {stack.redis_url}   nats {stack.nats_url}   triton grpc {stack.triton_url}",
            flush=True,
        )
        if stack.certificates is not None:
            tls_dir = stack.certificates.ca_file.parent
            print(
                f"  mutual TLS: CA and client certificate ({stack.certificates.client_identity}) "
                f"in {tls_dir}; NATS: TLS + password, Redis: ACL user\n"
                f"  try: cascade score --target {stack.target} --tls-dir {tls_dir}",
                flush=True,
            )
        if stack.traces is not None:
            print(
                f"  traces: every span goes to {stack.traces.spans_path}; "
                f"see one with: cascade trace TRACE_ID --run-dir {config.run_dir}",
                flush=True,
            )
        lines: list[str] = []
        if args.sample:
            lines = await score_samples(
                stack.target,
                args.sample,
                args.seed,
                args.deadline_ms,
                history=not args.no_history,
                tls=stack.client_tls,
            )
            for line in lines:
                print(line)
        # Exporters send every 200 ms (Triton's own too): let the sample's spans land, up to
        # Triton's of each escalated call.
        if (
            lines
            and stack.traces is not None
            and not await wait_for_services(
                stack.traces.store_dir,
                _sample_services(lines),
                at_least_s=_TRACE_SETTLE_S,
                at_most_s=_TRACE_SETTLE_MAX_S,
            )
        ):
            print(f"  traces: some spans had not come after {_TRACE_SETTLE_MAX_S:g} s")
        if args.exit_after_sample:
            return 0
        print("running; Ctrl-C (SIGINT) or SIGTERM stops every process", flush=True)
        await stop.wait()
        restarts = stack.supervisor.restarts if stack.supervisor is not None else {}
        print(f"stopping ... ({restart_summary(restarts)})", flush=True)
    return 0


async def _score(args: argparse.Namespace) -> int:
    tls = ClientTls.from_dir(args.tls_dir) if args.tls_dir is not None else None
    if tls is None and args.ca_file is not None:
        tls = ClientTls(args.ca_file)
    token = None
    if args.token_file is not None:
        try:
            token = args.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            print(f"cascade score: --token-file {args.token_file}: {exc.strerror}", file=sys.stderr)
            return 2
    for line in await score_samples(
        args.target,
        args.count,
        args.seed,
        args.deadline_ms,
        history=not args.no_history,
        tls=tls,
        token=token,
    ):
        print(line)
    return 0


def _trace(args: argparse.Namespace) -> int:
    store = args.run_dir.resolve() / "traces"
    spans = read_trace(store, args.trace_id)
    if not spans:
        print(
            f"no spans of trace {args.trace_id} in {store / SPANS_FILE} "
            "(was the stack started with --traces? spans arrive a moment after the call)",
            file=sys.stderr,
        )
        return 1
    for line in waterfall(spans):
        print(line)
    return 0


def _card_tokens(card_id: str, run_dir: Path) -> frozenset[str]:
    """The tokens ``card_id`` is recorded under: with the pseudonym key the environment
    configures (as the orchestrators read it), else the run dir's own (``cascade up``'s)."""
    settings = Settings().pseudonym
    if settings.key is None and settings.key_file is None:
        key_file = run_dir.resolve() / PSEUDONYM_KEY_FILE
        if not key_file.exists():
            raise ConfigurationError(
                f"no pseudonym key: set CASCADE_PSEUDONYM__KEY(_FILE) as the orchestrators have "
                f"it, or name the stack's run dir (no {key_file})"
            )
        settings = settings.model_copy(update={"key_file": key_file})
    return frozenset(pseudonym_from_settings(settings).card_tokens(card_id))


async def _decisions(args: argparse.Namespace) -> int:
    if args.format == "parquet" and (args.follow or args.out is None):
        print(
            "cascade decisions: --format parquet needs --out FILE and no --follow", file=sys.stderr
        )
        return 2
    try:
        cards = _card_tokens(args.card, args.run_dir) if args.card is not None else None
    except ConfigurationError as exc:
        print(f"cascade decisions: --card: {exc}", file=sys.stderr)
        return 2
    where = DecisionFilter(
        card_tokens=cards,
        decision=args.decision,
        reason=args.reason,
        decided_by=args.decided_by,
        policy_version=args.policy,
        stage1_version=args.stage1,
        stage2_version=args.stage2,
        since_ms=args.since,
        until_ms=args.until,
    )
    rows = read_decision_rows(
        args.nats,
        stream=args.stream,
        subject_prefix=args.subject_prefix,
        where=where,
        follow=args.follow,
    )
    count = 0
    try:
        if args.format == "parquet":
            collected = [row async for row in rows]
            count = write_parquet(collected, args.out)
        else:
            out = sys.stdout if args.out is None else args.out.open("w", encoding="utf-8")
            try:
                async for row in rows:
                    if args.format == "jsonl":
                        count += write_jsonl([row], out)
                    else:
                        print(table_line(row), file=out)
                        count += 1
                    if args.follow:
                        out.flush()
                    if args.limit is not None and count >= args.limit:
                        break
            finally:
                if out is not sys.stdout:
                    out.close()
    except DependencyError as exc:
        print(f"cascade decisions: cannot read stream {args.stream}: {exc}", file=sys.stderr)
        return 1
    if args.out is not None:
        print(f"{count} decision records written to {args.out}", file=sys.stderr)
    return 0


def _time_ms(text: str) -> int:
    try:
        return parse_time_ms(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _trace_id(text: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{32}", text):
        raise argparse.ArgumentTypeError(f"a trace id is 32 hex characters, got {text!r}")
    return text.lower()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cascade",
        description="Run the fraud-scoring cascade's local stack, score sample transactions "
        "against it, load-test it, and look at its traces.",
        epilog="Each command has its own --help. Settings of the services are CASCADE_* "
        "variables (cascade/settings.py lists them): pass them with cascade up --env-file/--set.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser(
        "up",
        help="run the local stack until SIGINT/SIGTERM",
        description="Start redis-server, nats-server, Triton, the screening workers and the "
        "orchestrator processes on 127.0.0.1, wait until every one is healthy, print the "
        "scoring endpoint, optionally score sample traffic, and run until SIGINT/SIGTERM; then "
        "stop every process it started. Any port may be 0 (a free one).",
    )
    defaults = StackPorts()
    up.add_argument("--port", type=int, default=defaults.grpc, help="orchestrator gRPC port")
    up.add_argument("--redis-port", type=int, default=defaults.redis, help="redis-server port")
    up.add_argument("--nats-port", type=int, default=defaults.nats, help="nats-server port")
    up.add_argument(
        "--triton-grpc-port", type=int, default=defaults.triton_grpc, help="Triton's gRPC port"
    )
    up.add_argument(
        "--triton-http-port", type=int, default=defaults.triton_http, help="Triton's HTTP port"
    )
    up.add_argument(
        "--triton-metrics-port",
        type=int,
        default=defaults.triton_metrics,
        help="Triton's Prometheus port",
    )
    up.add_argument("--workers", type=int, default=2, help="screening workers in the queue group")
    up.add_argument(
        "--cpu-latency-us",
        type=non_negative_int,
        metavar="US",
        help="while the stack runs, hold /dev/cpu_dma_latency at US microseconds (0: idle cores "
        "poll instead of halting; what a latency-performance tuned profile does; costs the "
        "host's CPU; needs root). `cascade loadtest --compare-cpu-latency-us` measures it here",
    )
    up.add_argument(
        "--cluster",
        action="store_true",
        help="a 3-node NATS cluster (routes, JetStream, streams with 3 replicas) and a 3-master "
        "Redis Cluster (a replica each) on free ports instead of one NATS and one Redis "
        "(--redis-port and --nats-port are not used); every service gets every node",
    )
    up.add_argument(
        "--orchestrators",
        type=positive_int,
        default=local_stack_orchestrators(),
        help="orchestrator processes sharing the port (default: one per two CPU cores, at "
        "least one: the workers, NATS, Redis and Triton share the cores)",
    )
    up.add_argument(
        "--model-dir",
        type=Path,
        default=DEFAULT_MODEL_DIR,
        help="folder with registry.json, the models and policies (default: the repo's models/)",
    )
    up.add_argument(
        "--run-dir",
        type=Path,
        default=REPO_ROOT / ".run",
        help="where logs, Triton's model repository and traces go (default: .run/)",
    )
    up.add_argument("--sample", type=int, default=0, help="score this many sample transactions")
    up.add_argument("--exit-after-sample", action="store_true", help="stop after the sample")
    up.add_argument(
        "--traces",
        action="store_true",
        help="trace every call: a local OTLP receiver stores all spans (Triton's too) in "
        "RUN_DIR/traces for `cascade trace`",
    )
    up.add_argument(
        "--supervisor-metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve the supervisor's restart counter (cascade_stack_restarts_total) on this "
        "port's /metrics (0: a free one; default: off)",
    )
    up.add_argument(
        "--tls",
        action="store_true",
        help="the secure stack: a new local CA in RUN_DIR/tls, mutual TLS with required caller "
        "identities on the scoring port, NATS with TLS and a password, Redis with an ACL user",
    )
    up.add_argument(
        "--env-file",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="KEY=VALUE lines (CASCADE_* settings, OTEL_*) for every service; repeatable",
    )
    up.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one setting for every service, e.g. --set CASCADE_BUDGET__SLO_MS=30; repeatable, "
        "wins over --env-file",
    )
    trace_cmd = sub.add_parser(
        "trace",
        help="print one stored trace as a waterfall",
        description="Print the spans of one trace stored by `cascade up --traces` (service, "
        "span, start offset and duration in ms, and the attributes that matter).",
    )
    trace_cmd.add_argument(
        "trace_id", type=_trace_id, help="32 hex characters (the answer's trace_id)"
    )
    trace_cmd.add_argument(
        "--run-dir",
        type=Path,
        default=REPO_ROOT / ".run",
        help="the run dir of `cascade up --traces`",
    )
    score = sub.add_parser(
        "score",
        help="score sample transactions against a running stack",
        description="Send simulated transactions (with the simulator's ground truth) to a "
        "running stack and print each answer: decision, score, what decided it, per-stage "
        "times, the trace id and the reasons.",
    )
    score.add_argument(
        "--target", default=f"127.0.0.1:{defaults.grpc}", help="the scoring endpoint, host:port"
    )
    score.add_argument(
        "--count", type=positive_int, default=20, help="how many transactions to score"
    )
    score.add_argument(
        "--tls-dir",
        type=Path,
        metavar="DIR",
        help="mutual TLS with the CA and client certificate `cascade up --tls` wrote "
        "(RUN_DIR/tls: ca.crt, client.crt, client.key)",
    )
    score.add_argument(
        "--ca-file", type=Path, metavar="FILE", help="TLS, trusting this CA (no client cert)"
    )
    score.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="send the bearer token in FILE with every call (authorization metadata)",
    )
    for p in (up, score):
        p.add_argument("--seed", type=int, default=7, help="sample-traffic seed")
        p.add_argument(
            "--no-history",
            action="store_true",
            help="do not send the sampled cards' earlier transactions first",
        )
        p.add_argument("--deadline-ms", type=float, default=50.0, help="per-call gRPC deadline")
    decisions = sub.add_parser(
        "decisions",
        help="tail, filter and export the decision log (JetStream stream DECISIONS)",
        description="Read every answer the orchestrators recorded (docs/decision_log.md), "
        "oldest first, keep those that pass the filters, and print them as a table, JSON Lines "
        "or Parquet. Without --follow it stops at the last record present when it started.",
    )
    decisions.add_argument(
        "--nats",
        default=f"nats://127.0.0.1:{defaults.nats}",
        help="NATS with the stream (default: the local stack's)",
    )
    decisions.add_argument("--stream", default="DECISIONS", help="the stream's name")
    decisions.add_argument(
        "--subject-prefix", default="decisions", help="records are on PREFIX.<policy version>"
    )
    decisions.add_argument("--follow", "-f", action="store_true", help="wait for new records")
    decisions.add_argument(
        "--card",
        metavar="CARD_ID",
        help="only this card's transactions (hashed with the pseudonym key: "
        "CASCADE_PSEUDONYM__KEY(_FILE) or the run dir's)",
    )
    decisions.add_argument(
        "--run-dir",
        type=Path,
        default=REPO_ROOT / ".run",
        help="the run dir of `cascade up`, whose pseudonym key --card uses when the environment "
        "names none (default: .run/)",
    )
    decisions.add_argument(
        "--decision", choices=("APPROVE", "REVIEW", "DECLINE"), help="only answers with it"
    )
    decisions.add_argument(
        "--reason", metavar="CODE", help="answers carrying it, e.g. STAGE2_TIMEOUT"
    )
    decisions.add_argument(
        "--decided-by",
        choices=("CACHE", "STAGE1", "STAGE2", "DEFAULT"),
        dest="decided_by",
        help="only answers decided by it",
    )
    decisions.add_argument("--policy", metavar="VERSION", help="policy version (e.g. policy-3)")
    decisions.add_argument("--stage1", metavar="VERSION", help="stage-1 model version")
    decisions.add_argument("--stage2", metavar="VERSION", help="stage-2 model version")
    decisions.add_argument(
        "--since",
        type=_time_ms,
        metavar="TIME",
        help="decided at or after: ISO 8601 (UTC unless it says), epoch ms, or 15m / 2h / 7d ago",
    )
    decisions.add_argument("--until", type=_time_ms, metavar="TIME", help="decided before")
    decisions.add_argument(
        "--format", choices=("table", "jsonl", "parquet"), default="table", help="output format"
    )
    decisions.add_argument("--out", type=Path, metavar="FILE", help="write here (default: stdout)")
    decisions.add_argument(
        "--limit", type=positive_int, metavar="N", help="stop after N records (table, jsonl)"
    )
    add_rollout_arguments(sub)
    add_quality_commands(sub)
    from loadtests.cli import add_arguments as add_loadtest_arguments

    loadtest = sub.add_parser(
        "loadtest", help="load the stack (own or --target); write report.json and PNGs"
    )
    add_loadtest_arguments(loadtest)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cascade`` command."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "loadtest":
        from loadtests.cli import run as run_loadtest

        try:
            return run_loadtest(args, list(argv) if argv is not None else sys.argv[2:])
        except KeyboardInterrupt:
            return 130
    if args.command == "trace":
        return _trace(args)
    if args.command == "rollout":
        return run_rollout(args)
    if args.command in ("outcomes", "quality"):
        try:
            return run_outcomes(args) if args.command == "outcomes" else run_quality(args)
        except KeyboardInterrupt:
            return 130
    if args.command == "decisions":
        try:
            return asyncio.run(_decisions(args))
        except KeyboardInterrupt:
            return 130
    command = _up if args.command == "up" else _score
    try:
        return asyncio.run(command(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
