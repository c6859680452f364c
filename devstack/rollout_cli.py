"""``cascade rollout``: put a candidate in the registry, promote it, roll it back.

Every command rewrites ``registry.json`` atomically (:func:`cascade.model_registry.write_registry`)
after validating the result exactly as a serving process will (:func:`load_registry`: schema,
checksums, versions apart), so a bad change is refused here and never reaches the stack. Running
orchestrators and workers notice the new file within ``rollout.reload_interval_s`` and switch
without a restart (``docs/rollout.md``); ``cascade up`` must have been started with the stage-2
versions the registry names (a stage-2 candidate added later needs a restart of the stack).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from cascade.model_registry import (
    Candidate,
    Registry,
    RegistryError,
    StageArtifact,
    load_registry,
    promoted,
    rolled_back,
    sha256_file,
    verify_registry,
    write_registry,
)
from cascade.settings import DEFAULT_MODEL_DIR

__all__ = ["add_arguments", "run"]


def add_arguments(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``rollout`` and its subcommands to the ``cascade`` parser."""
    rollout = sub.add_parser(
        "rollout",
        help="candidate, canary, promote and rollback of model versions (docs/rollout.md)",
        description="Change which versions the registry serves; running services follow it.",
    )
    commands = rollout.add_subparsers(dest="rollout_command", required=True, help="what to do")
    status = commands.add_parser("status", help="print the champion, candidate and previous")
    candidate = commands.add_parser(
        "candidate", help="name a candidate (stage 1, stage 2 and/or policy) in the registry"
    )
    candidate.add_argument(
        "--stage2-variant",
        metavar="VERSION",
        help="a servable variant of models/heavy/variants.json (e.g. s2-2-fp16)",
    )
    candidate.add_argument(
        "--triton-version",
        type=int,
        default=None,
        help="its Triton model version (default: the champion's + 1)",
    )
    candidate.add_argument(
        "--stage1", metavar="VERSION:PATH", help="a stage-1 ONNX file (relative to the model dir)"
    )
    candidate.add_argument("--policy", metavar="PATH", help="a policy file (relative)")
    candidate.add_argument(
        "--share",
        type=float,
        default=None,
        help="share of cards it scores live, 0-1 (default: the services' "
        "CASCADE_ROLLOUT__CANARY_SHARE; 0: shadow only)",
    )
    share = commands.add_parser(
        "share", help="change the candidate's canary share; running services follow it"
    )
    share.add_argument("share", type=float, help="0-1; 0 ends the live canary, keeps the shadow")
    promote = commands.add_parser(
        "promote", help="the candidate becomes the champion (the old one kept for rollback)"
    )
    rollback = commands.add_parser(
        "rollback", help="drop the candidate; without one, restore the previous champion"
    )
    shadow = commands.add_parser(
        "shadow",
        help="score the candidate on the decision log's records (off the request path)",
        description="Read DECISIONS, score the registry's candidate on every record the "
        "champion answered normally, write one JSON line each (see docs/rollout.md).",
    )
    shadow.add_argument(
        "--nats", default="nats://127.0.0.1:14222", help="NATS with DECISIONS (default: local)"
    )
    shadow.add_argument(
        "--redis",
        default=None,
        help="Redis with the card histories (needed for a stage-2 candidate), e.g. "
        "redis://127.0.0.1:16379/0",
    )
    shadow.add_argument(
        "--out", type=Path, default=Path(".run/shadow.jsonl"), help="append the results here"
    )
    shadow.add_argument("--follow", "-f", action="store_true", help="wait for new records")
    shadow.add_argument("--since", metavar="TIME", help="records decided at or after (15m, ISO)")
    shadow.add_argument("--limit", type=int, default=None, help="stop after N scored records")
    report = commands.add_parser(
        "report", help="compare candidate and champion on the shadow results"
    )
    report.add_argument(
        "--shadow",
        type=Path,
        default=Path(".run/shadow.jsonl"),
        help="cascade rollout shadow's file",
    )
    report.add_argument(
        "--labels",
        type=Path,
        default=None,
        help="JSON Lines of {transaction_id, fraud} for precision and recall (optional)",
    )
    report.add_argument(
        "--outcomes",
        action="store_true",
        help="labels from the OUTCOMES stream (ReportOutcome, cascade outcomes import)",
    )
    report.add_argument(
        "--nats", default="nats://127.0.0.1:14222", help="with --outcomes: NATS with JetStream"
    )
    report.add_argument(
        "--outcomes-stream", default="OUTCOMES", help="with --outcomes: the outcome stream"
    )
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    for p in (status, candidate, share, promote, rollback, shadow):
        p.add_argument(
            "--model-dir",
            type=Path,
            default=DEFAULT_MODEL_DIR,
            help="folder holding registry.json (default: the repository's models/)",
        )


def _describe(registry: Registry) -> str:
    lines = [
        f"champion   policy {registry.policy}  stage1 {registry.stage1.version}  "
        f"stage2 {registry.stage2.version} (triton v{registry.stage2.triton_version})"
    ]
    c = registry.candidate
    if c is not None:
        parts = []
        if c.policy is not None:
            parts.append(f"policy {c.policy}")
        if c.stage1 is not None:
            parts.append(f"stage1 {c.stage1.version}")
        if c.stage2 is not None:
            parts.append(f"stage2 {c.stage2.version} (triton v{c.stage2.triton_version})")
        parts.append(
            "share: the services' setting"
            if c.canary_share is None
            else f"share {c.canary_share:.1%} of cards"
        )
        lines.append("candidate  " + "  ".join(parts))
    p = registry.previous
    if p is not None:
        lines.append(
            f"previous   policy {p.policy}  stage1 {p.stage1.version}  stage2 {p.stage2.version}"
        )
    return "\n".join(lines)


def _checked_write(model_dir: Path, registry: Registry) -> Registry:
    """Validate ``registry`` as the services will, then replace the file."""
    verify_registry(registry, model_dir)
    write_registry(model_dir, registry)
    return load_registry(model_dir)


def _candidate(args: argparse.Namespace, registry: Registry) -> Registry:
    model_dir: Path = args.model_dir
    stage2 = stage1 = None
    if args.stage2_variant:
        variants = json.loads((model_dir / "heavy" / "variants.json").read_text())
        found = [v for v in variants["variants"] if v["version"] == args.stage2_variant]
        if not found or not found[0].get("servable", False):
            raise RegistryError(f"{args.stage2_variant!r} is not a servable variant")
        v = found[0]
        stage2 = StageArtifact(
            version=v["version"],
            path=v["path"],
            sha256=v["sha256"],
            triton_model=registry.stage2.triton_model,
            triton_version=args.triton_version or (registry.stage2.triton_version or 1) + 1,
        )
    if args.stage1:
        version, _, path = args.stage1.partition(":")
        stage1 = StageArtifact(version=version, path=path, sha256=sha256_file(model_dir / path))
    try:
        candidate = Candidate(
            policy=args.policy, stage1=stage1, stage2=stage2, canary_share=args.share
        )
        return Registry.model_validate(
            {**registry.model_dump(exclude_none=True), "candidate": candidate.model_dump()}
        )
    except ValueError as exc:
        raise RegistryError(str(exc)) from None


def _shared(registry: Registry, share: float) -> Registry:
    if registry.candidate is None:
        raise RegistryError("the registry has no candidate to share traffic with")
    try:
        candidate = registry.candidate.model_copy(update={"canary_share": share})
        return Registry.model_validate(
            {**registry.model_dump(exclude_none=True), "candidate": candidate.model_dump()}
        )
    except ValueError as exc:
        raise RegistryError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    """Run one ``cascade rollout`` subcommand; 2 with a message when the registry refuses."""
    if args.rollout_command == "report":
        return _report(args)
    if args.rollout_command == "shadow":
        return _shadow(args)
    model_dir: Path = args.model_dir
    try:
        registry = load_registry(model_dir)
        if args.rollout_command == "status":
            print(_describe(registry))
            return 0
        if args.rollout_command == "candidate":
            changed = _candidate(args, registry)
        elif args.rollout_command == "share":
            changed = _shared(registry, args.share)
        elif args.rollout_command == "promote":
            changed = promoted(registry)
        else:
            changed = rolled_back(registry)
        now = _checked_write(model_dir, changed)
    except RegistryError as exc:
        print(f"cascade rollout {args.rollout_command}: {exc}", file=sys.stderr)
        return 2
    print(_describe(now))
    print(
        "running orchestrators and workers switch within CASCADE_ROLLOUT__RELOAD_INTERVAL_S "
        "once the new versions answer; cache keys name the versions, so nothing cached under "
        "another version is served"
    )
    return 0


def _shadow(args: argparse.Namespace) -> int:
    from devstack.decision_rows import parse_time_ms
    from devstack.shadow import run_shadow

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a", encoding="utf-8") as out:
        try:
            stats = asyncio.run(
                run_shadow(
                    args.nats,
                    args.model_dir,
                    out,
                    redis_url=args.redis,
                    since_ms=parse_time_ms(args.since) if args.since else None,
                    follow=args.follow,
                    limit=args.limit,
                )
            )
        except (RegistryError, ValueError) as exc:
            print(f"cascade rollout shadow: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
    print(
        f"read {stats.read} records, scored {stats.scored}, skipped {stats.skipped} -> {args.out}"
    )
    return 0


def _report(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from devstack.rollout_report import JsonlLabelSource, build_report, format_report

    if not args.shadow.is_file():
        print(f"cascade rollout report: {args.shadow} does not exist", file=sys.stderr)
        return 2
    rows = [json.loads(line) for line in args.shadow.read_text().splitlines() if line.strip()]
    labels = None
    ids = [str(r["transaction_id"]) for r in rows]
    if args.labels is not None and args.outcomes:
        print("cascade rollout report: --labels or --outcomes, not both", file=sys.stderr)
        return 2
    if args.labels is not None:
        labels = JsonlLabelSource(args.labels).labels(ids)
    elif args.outcomes:
        from cascade.errors import DependencyError
        from cascade.quality_job import read_outcome_labels

        try:
            stored = asyncio.run(read_outcome_labels(args.nats, args.outcomes_stream))
        except DependencyError as exc:
            print(f"cascade rollout report: cannot read the outcomes: {exc}", file=sys.stderr)
            return 1
        labels = {t: stored[t] for t in ids if t in stored}
    report = build_report(rows, labels)
    print(json.dumps(asdict(report), indent=2) if args.json else format_report(report))
    return 0
