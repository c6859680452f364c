"""``cascade outcomes import`` and ``cascade quality``: the label loop's commands.

* ``cascade outcomes import FILE.csv|FILE.jsonl``: validate every row (the same checks as
  ``ReportOutcome``), then store them all on the ``OUTCOMES`` stream, each acknowledged;
  importing a file again stores nothing twice (message id = transaction id + label kind).
* ``cascade outcomes score-stream FILE.jsonl.gz``: send a simulated stream to the stack in order
  (``ScoreBatch``), so its decisions are on the log for ``python -m training outcomes``'s labels.
* ``cascade quality``: join decisions and outcomes and print a table per window and version
  (``--format json`` for machines); ``--serve`` keeps following both streams and serves the
  numbers as Prometheus gauges on ``--metrics-port`` (:mod:`cascade.quality_job`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path

import grpc
from prometheus_client import REGISTRY, start_http_server

from cascade.errors import DependencyError, InvalidInputError
from cascade.model_registry import load_registry
from cascade.outcome_record import VIA_FILE_IMPORT, parse_outcome_file, validate_outcome
from cascade.outcome_store import OutcomeStore
from cascade.quality import parse_window, report_json, report_table
from cascade.quality_job import QualityService, StreamNames, load_references, measure_once
from cascade.settings import DEFAULT_MODEL_DIR, OutcomeSettings
from cascade.v1 import scoring_pb2, scoring_pb2_grpc

__all__ = ["add_quality_commands", "run_outcomes", "run_quality"]

_DEFAULT_NATS = "nats://127.0.0.1:14222"


def _windows(text: str) -> list[int]:
    try:
        return [parse_window(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_quality_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``outcomes`` and ``quality`` to the ``cascade`` command line."""
    outcomes = sub.add_parser(
        "outcomes",
        help="report outcomes (labels) in bulk",
        description="Store labels (confirmed fraud, chargeback, genuine) on the OUTCOMES stream.",
    )
    verbs = outcomes.add_subparsers(dest="outcomes_command", required=True, help="what to do")
    imp = verbs.add_parser("import", help="store every outcome of a CSV or JSON Lines file")
    imp.add_argument("file", type=Path, help="FILE.csv (with a header) or FILE.jsonl")
    imp.add_argument("--nats", default=_DEFAULT_NATS, help="NATS with JetStream")
    imp.add_argument("--stream", default="OUTCOMES", help="the outcome stream's name")
    imp.add_argument("--subject-prefix", default="outcomes", help="outcomes go to PREFIX.<kind>")
    replay = verbs.add_parser(
        "score-stream", help="score a simulated stream (python -m training simulate) in order"
    )
    replay.add_argument(
        "stream", type=Path, help="a .jsonl.gz written by `python -m training simulate`"
    )
    replay.add_argument("--target", default="127.0.0.1:50051", help="the scoring endpoint")
    replay.add_argument("--batch", type=int, default=500, help="transactions per ScoreBatch call")

    quality = sub.add_parser(
        "quality",
        help="live precision, recall, PR-AUC and drift",
        description="Join the decision log with the outcomes and measure each model and policy "
        "version over sliding windows of decision time (docs/quality.md).",
    )
    quality.add_argument("--nats", default=_DEFAULT_NATS, help="NATS with JetStream")
    quality.add_argument("--decisions-stream", default="DECISIONS", help="the decision stream")
    quality.add_argument("--outcomes-stream", default="OUTCOMES", help="the outcome stream")
    quality.add_argument(
        "--windows", type=_windows, default=[3600, 86400, 604800], help="e.g. 1h,24h,7d"
    )
    quality.add_argument(
        "--unlabelled",
        choices=["genuine", "exclude"],
        default="genuine",
        help="count unlabelled decisions as genuine (default) or leave them out",
    )
    quality.add_argument(
        "--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="where drift references are"
    )
    quality.add_argument("--format", choices=["table", "json"], default="table", help="output")
    quality.add_argument("--serve", action="store_true", help="follow and serve gauges")
    quality.add_argument("--metrics-port", type=int, default=9470, help="with --serve")
    quality.add_argument(
        "--metrics-host", default="127.0.0.1", help="with --serve: the address to bind"
    )
    quality.add_argument("--refresh-s", type=float, default=30.0, help="with --serve")


async def _import(args: argparse.Namespace) -> int:
    path: Path = args.file
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    now_ms = int(time.time() * 1000)
    outcomes: list[scoring_pb2.Outcome] = []
    try:
        text = await asyncio.to_thread(path.read_text)
        for line_no, outcome in parse_outcome_file(text, jsonl=jsonl):
            try:
                outcomes.append(validate_outcome(outcome, now_ms=now_ms))
            except InvalidInputError as exc:
                raise ValueError(f"line {line_no}: {exc}") from None
    except (OSError, ValueError) as exc:
        print(f"cascade outcomes import: {path}: {exc}; nothing stored", file=sys.stderr)
        return 2
    settings = OutcomeSettings(stream=args.stream, subject_prefix=args.subject_prefix)
    try:
        async with OutcomeStore(args.nats, settings, name="cascade-outcomes-import") as store:
            stored = await store.store_many(outcomes, now_ms, VIA_FILE_IMPORT)
    except DependencyError as exc:
        print(f"cascade outcomes import: not all stored ({exc}); run it again", file=sys.stderr)
        return 1
    duplicates = sum(s.duplicate for s in stored)
    print(f"stored {len(stored) - duplicates} outcomes ({duplicates} already stored) from {path}")
    return 0


async def _score_stream(args: argparse.Namespace) -> int:
    from cascade.wire import to_wire
    from training.simulator import read_stream

    records = await asyncio.to_thread(lambda: list(read_stream(args.stream)))
    counts: dict[str, int] = {}
    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        for start in range(0, len(records), args.batch):
            chunk = [to_wire(r.tx) for r in records[start : start + args.batch]]
            reply = await stub.ScoreBatch(
                scoring_pb2.ScoreBatchRequest(transactions=chunk), timeout=120
            )
            for answer in reply.results:
                name = scoring_pb2.Decision.Name(answer.decision).removeprefix("DECISION_")
                counts[name] = counts.get(name, 0) + 1
    summary = ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
    print(f"scored {len(records)} transactions of {args.stream}: {summary}")
    return 0


def run_outcomes(args: argparse.Namespace) -> int:
    """``cascade outcomes import`` / ``score-stream``."""
    if args.outcomes_command == "score-stream":
        return asyncio.run(_score_stream(args))
    return asyncio.run(_import(args))


async def _quality(args: argparse.Namespace) -> int:
    registry = load_registry(args.model_dir)
    references = load_references(args.model_dir, [registry.stage1.version])
    streams = StreamNames(args.decisions_stream, args.outcomes_stream)
    if not args.serve:
        try:
            report = await measure_once(
                args.nats,
                windows_s=args.windows,
                references=references,
                streams=streams,
                unlabelled=args.unlabelled,
            )
        except DependencyError as exc:
            print(f"cascade quality: cannot read the streams: {exc}", file=sys.stderr)
            return 1
        if args.format == "json":
            print(json.dumps(report_json(report), indent=2))
        else:
            print("\n".join(report_table(report)))
        return 0
    start_http_server(args.metrics_port, addr=args.metrics_host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with QualityService(
        args.nats,
        windows_s=args.windows,
        references=references,
        refresh_s=args.refresh_s,
        streams=streams,
        unlabelled=args.unlabelled,
    ) as service:
        REGISTRY.register(service.collector)
        print(
            f"serving quality gauges on http://{args.metrics_host}:{args.metrics_port}/metrics",
            flush=True,
        )
        await stop.wait()
    return 0


def run_quality(args: argparse.Namespace) -> int:
    """``cascade quality``."""
    return asyncio.run(_quality(args))
