"""Command line for the training tools: ``python -m training COMMAND ...``.

- ``simulate``: write a replayable labelled stream (gzip JSON lines) for load tests / experiments.
- ``train``: the whole pipeline of :mod:`training.train`; versioned artifacts under
  ``--model-dir`` (default ``models/``) and ``models/registry.json`` pointing at them.
- ``quantize``: INT8 / FP16 variants of the registered stage 2, measured on the held-out days
  (:mod:`training.quantize`).
- ``report``: regenerate ``docs/model_report.md`` and its charts (:mod:`training.report`).
- ``calibrate``: a new policy version for a target escalation rate, from a separate calibration
  stream; ``--activate`` makes the registry point at it.
- ``drift-reference``: score and feature bins of the registered stage 1's training rows, written
  beside its model (``drift_reference.json``, read by ``cascade quality``).
- ``outcomes``: the outcome file (``cascade outcomes import``) of a simulated stream, with
  realistic label delays (:mod:`training.labels`).
- ``degraded-report``: measure how to decide without card history (Redis down) and write
  ``docs/degraded_policy.md`` (:mod:`training.degraded`); ``--write-policy`` writes the chosen
  ``features_unavailable`` section into a new policy version.

The defaults of ``--seed/--cards/--days/--holdout-days`` are those the committed models were
trained with, so ``report`` and ``quantize`` evaluate on days the models never saw.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

from cascade.settings import DEFAULT_MODEL_DIR
from training.simulator import SimulationConfig, simulate, write_stream


def _simulation_args(parser: argparse.ArgumentParser) -> None:
    defaults = SimulationConfig()
    parser.add_argument("--seed", type=int, default=defaults.seed, help="simulator seed")
    parser.add_argument("--cards", type=int, default=defaults.n_cards, help="number of cards")
    parser.add_argument("--days", type=int, default=defaults.n_days, help="days simulated")


def _simulation_config(args: argparse.Namespace) -> SimulationConfig:
    return SimulationConfig(seed=args.seed, n_cards=args.cards, n_days=args.days)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    sim = commands.add_parser("simulate", help="write a labelled transaction stream")
    _simulation_args(sim)
    sim.add_argument("--out", type=Path, required=True, help="output file (.jsonl.gz)")

    train = commands.add_parser("train", help="train, export and register both stages")
    _simulation_args(train)
    train.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    train.add_argument("--stage1-version", default="s1-1")
    train.add_argument("--stage2-version", default="s2-1")
    train.add_argument("--policy-version", default="policy-1")
    train.add_argument("--triton-version", type=int, default=1)
    train.add_argument("--escalation-rate", type=float, default=0.08)
    train.add_argument("--holdout-days", type=int, default=25, help="evaluation window")
    train.add_argument(
        "--calibration-days", type=int, default=15, help="thresholds picked on these days"
    )
    train.add_argument("--force", action="store_true", help="overwrite existing versions")

    quantize = commands.add_parser("quantize", help="INT8 / FP16 variants of stage 2")
    _simulation_args(quantize)
    quantize.add_argument("--holdout-days", type=int, default=25)
    quantize.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    quantize.add_argument("--margin", type=float, default=0.01, help="max PR-AUC loss")
    quantize.add_argument(
        "--max-flip-rate",
        type=float,
        default=0.005,
        help="max share of escalated decisions that may differ at the policy's thresholds",
    )
    quantize.add_argument(
        "--recall-margin",
        type=float,
        default=0.01,
        help="max recall loss of any fraud pattern (REVIEW-or-DECLINE and DECLINE)",
    )
    quantize.add_argument(
        "--max-abs-score-diff", type=float, default=0.02, help="max stage-2 score difference"
    )

    report = commands.add_parser("report", help="regenerate docs/model_report.md")
    _simulation_args(report)
    report.add_argument("--holdout-days", type=int, default=25, help="evaluation window")
    report.add_argument(
        "--calibration-days",
        type=int,
        default=15,
        help="the days before the evaluation window, where `train` picks the thresholds "
        "(0: do not measure them)",
    )
    report.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    report.add_argument("--docs-dir", type=Path, default=DEFAULT_MODEL_DIR.parent / "docs")

    calib = commands.add_parser("calibrate", help="write a policy for a target escalation rate")
    calib.add_argument("--escalation-rate", type=float, required=True, help="e.g. 0.05")
    calib.add_argument("--policy-version", required=True, help="e.g. policy-2")
    calib.add_argument("--activate", action="store_true", help="point the registry at it")
    calib.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    calib.add_argument("--seed", type=int, default=1007, help="calibration stream seed")
    calib.add_argument("--cards", type=int, default=4000)
    calib.add_argument("--days", type=int, default=60)

    degraded = commands.add_parser(
        "degraded-report", help="measure decisions without card history, write the policy section"
    )
    degraded.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    degraded.add_argument("--docs-dir", type=Path, default=DEFAULT_MODEL_DIR.parent / "docs")
    degraded.add_argument(
        "--write-policy", metavar="VERSION", help="write the active thresholds + chosen section"
    )
    degraded.add_argument("--activate", action="store_true", help="point the registry at it")

    drift = commands.add_parser(
        "drift-reference", help="training-data bins of the stage-1 score and main features"
    )
    _simulation_args(drift)
    drift.add_argument(
        "--holdout-days",
        type=int,
        default=40,
        help="days left out of training (calibration + evaluation windows)",
    )
    drift.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    drift.add_argument("--force", action="store_true", help="overwrite an existing reference")

    outcomes = commands.add_parser("outcomes", help="the outcome CSV of a simulated stream")
    outcomes.add_argument("--stream", type=Path, required=True, help="a `simulate` .jsonl.gz")
    outcomes.add_argument("--out", type=Path, required=True, help="output CSV")
    outcomes.add_argument("--seed", type=int, default=0, help="label-delay seed")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("training").setLevel(logging.INFO)

    if args.command == "simulate":
        count = write_stream(args.out, simulate(_simulation_config(args)))
        print(f"wrote {count} transactions to {args.out}")
        return 0

    if args.command == "drift-reference":
        from training.drift_reference import write_drift_reference

        path = write_drift_reference(
            args.model_dir, _simulation_config(args), args.holdout_days, force=args.force
        )
        print(f"wrote {path}")
        return 0

    if args.command == "outcomes":
        from training.labels import simulate_outcomes, write_outcome_csv
        from training.simulator import read_stream

        count = write_outcome_csv(
            args.out, simulate_outcomes(read_stream(args.stream), seed=args.seed)
        )
        print(f"wrote {count} outcomes to {args.out}")
        return 0

    if args.command == "degraded-report":
        from training.degraded import write_degraded_report

        if args.activate and not args.write_policy:
            parser.error("--activate needs --write-policy")
        measured = write_degraded_report(
            args.model_dir, args.docs_dir, write_policy=args.write_policy, activate=args.activate
        )
        print(
            f"wrote {measured.path}; chosen {measured.chosen.key}: "
            f"{measured.section.model_dump_json(exclude_none=True)}"
        )
        return 0

    if args.command in ("quantize", "report", "calibrate"):
        return _evaluate(args)

    from training.train import TrainConfig, run_training

    config = replace(
        TrainConfig(),
        simulation=_simulation_config(args),
        stage1_version=args.stage1_version,
        stage2_version=args.stage2_version,
        policy_version=args.policy_version,
        triton_version=args.triton_version,
        escalation_rate=args.escalation_rate,
        holdout_days=args.holdout_days,
        calibration_days=args.calibration_days,
    )
    result = run_training(args.model_dir, config, force=args.force)
    print(json.dumps(result.metrics, indent=2))
    print(f"policy: {result.policy.model_dump_json()}")
    print(f"wall time: {result.wall_s:.0f} s")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from cascade.model_registry import load_policy, load_registry
    from training.report import EvalConfig, calibrate, prepare_eval_set, write_report

    if args.command == "calibrate":
        config = EvalConfig(_simulation_config(args), first_day=14)
        result = calibrate(
            args.model_dir,
            args.escalation_rate,
            args.policy_version,
            config,
            activate=args.activate,
        )
        print(f"wrote {result.path}: {result.policy.model_dump_json()}")
        print(
            f"on the calibration stream: escalated {result.escalated_share:.2%}, "
            f"REVIEW FPR {result.review_fpr:.3%} recall {result.recall_review:.3f}, "
            f"DECLINE FPR {result.decline_fpr:.3%} recall {result.recall_decline:.3f}"
            + (" (now active)" if args.activate else "")
        )
        return 0
    config = EvalConfig(_simulation_config(args), first_day=args.days - args.holdout_days)
    if args.command == "report":
        first = args.days - args.holdout_days
        calibration = (
            EvalConfig(
                _simulation_config(args),
                first_day=first - args.calibration_days,
                end_day=first,
                seed=1,
            )
            if args.calibration_days > 0
            else None
        )
        print(f"wrote {write_report(args.model_dir, args.docs_dir, config, calibration)}")
        return 0
    from training.guardrails import GuardrailBounds
    from training.quantize import make_variants

    registry = load_registry(args.model_dir)
    policy = load_policy(registry.policy_path)
    eval_set = prepare_eval_set(registry, config)
    bounds = GuardrailBounds(
        pr_auc_margin=args.margin,
        max_flip_rate=args.max_flip_rate,
        recall_margin=args.recall_margin,
        max_abs_score_diff=args.max_abs_score_diff,
    )
    for r in make_variants(
        args.model_dir,
        registry.stage2.version,
        registry.stage2_path,
        eval_set,
        policy,
        bounds=bounds,
    ):
        print(
            f"{r.version}: PR-AUC {r.pr_auc:.4f} (FP32 {r.baseline_pr_auc:.4f}), escalated "
            f"decisions flipped {r.guardrails.flip_rate_escalated:.3%}, max score diff "
            f"{r.max_abs_score_diff:.4f}, batch-1 {r.latency_b1_ms:.3f} ms "
            f"(FP32 {r.baseline_latency_b1_ms:.3f} ms), servable={r.servable}"
            + "".join(f"\n  not servable: {f}" for f in r.guardrails.failures)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
