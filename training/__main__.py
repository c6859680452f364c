"""Command line for the training tools: ``python -m training {simulate,train} ...``.

``simulate`` writes a replayable labelled stream (gzip JSON lines) for load tests and
experiments; ``train`` runs the whole pipeline of :mod:`training.train` and writes versioned
artifacts under ``--model-dir`` (default ``models/``).
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
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
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
    train.add_argument("--force", action="store_true", help="overwrite existing versions")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    if args.command == "simulate":
        count = write_stream(args.out, simulate(_simulation_config(args)))
        print(f"wrote {count} transactions to {args.out}")
        return 0

    from training.train import TrainConfig, run_training

    config = replace(
        TrainConfig(),
        simulation=_simulation_config(args),
        stage1_version=args.stage1_version,
        stage2_version=args.stage2_version,
        policy_version=args.policy_version,
        triton_version=args.triton_version,
        escalation_rate=args.escalation_rate,
    )
    result = run_training(args.model_dir, config, force=args.force)
    print(json.dumps(result.metrics, indent=2))
    print(f"policy: {result.policy.model_dump_json()}")
    print(f"wall time: {result.wall_s:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
