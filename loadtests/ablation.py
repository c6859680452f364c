"""Measure what each optimization buys: the same load with one of them switched off.

Each variant is the real stack with one ``--stack-env`` setting changed. Variants run interleaved
for several rounds (A B C A B C ...), so drift of a shared machine hits them alike, and the table
reports each variant's median over the rounds, with the full-optimization ``all on`` row first.
Usage::

    python -m loadtests.ablation --rounds 3 --rate 300 --out docs/ablation
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

VARIANTS: Final[dict[str, tuple[str, ...]]] = {
    "all on": (),
    "no coalescing of concurrent calls": ("CASCADE_COALESCING__ENABLED=false",),
    "no decision log": ("CASCADE_DECISION_LOG__ENABLED=false",),
    "no admission control": ("CASCADE_ADMISSION__ENABLED=false",),
    "no gc.freeze after warm-up": ("CASCADE_GC_FREEZE=false",),
    "spans recorded (OTEL_TRACES_SAMPLER=always_on, no exporter)": (
        "OTEL_TRACES_SAMPLER=always_on",
    ),
}

# (column, where in report.json's target, statistic)
_COLUMNS: Final = (
    ("1-in-flight p50 ms", ("serial", "latency_ms", "p50")),
    ("1-in-flight p99 ms", ("serial", "latency_ms", "p99")),
    ("load p50 ms", ("step", "latency_ms", "p50")),
    ("load p99 ms", ("step", "latency_ms", "p99")),
    ("load p99.9 ms", ("step", "latency_ms", "p99_9")),
    ("orchestrator CPU ms/answer", ("step", "cpu", "ms_per_answer", "orchestrator")),
    ("workers CPU ms/answer", ("step", "cpu", "ms_per_answer", "screening-workers")),
    ("NATS CPU ms/answer", ("step", "cpu", "ms_per_answer", "nats")),
    ("stack CPU ms/answer", ("step", "cpu", "ms_per_answer", "stack")),
)


def extract(report: Mapping[str, Any]) -> dict[str, float]:
    """The table's numbers from one ``cascade loadtest`` report (single step, no baseline)."""
    target = report["targets"]["cascade"]
    sources = {"serial": target["serial"], "step": target["steps"][0]}
    values: dict[str, float] = {}
    for column, (source, *path) in _COLUMNS:
        node: Any = sources[source]
        for key in path:
            node = node[key]
        values[column] = float(node)
    return values


def summarize(runs: Mapping[str, Sequence[Mapping[str, float]]]) -> str:
    """A markdown table of medians per variant (pure)."""
    header = "| variant | runs | " + " | ".join(c for c, _ in _COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(_COLUMNS) + 2)]
    for name, results in runs.items():
        cells = [f"{statistics.median(r[c] for r in results):.3f}" for c, _ in _COLUMNS]
        lines.append(f"| {name} | {len(results)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _run_once(settings: Sequence[str], args: argparse.Namespace, out: Path) -> dict[str, float]:
    command = [
        sys.executable, "-m", "devstack.cli", "loadtest", "--no-baseline", "--no-progress",
        f"--rate={args.rate}", f"--duration={args.duration}", f"--serial-count={args.serial_count}",
        f"--out={out}",
        *(f"--stack-env={kv}" for kv in settings),
    ]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return extract(json.loads((out / "report.json").read_text()))


def main(argv: Sequence[str] | None = None) -> int:
    """Run every variant ``--rounds`` times, interleaved; print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--serial-count", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path(".run/ablation"))
    parser.add_argument(
        "--variant",
        action="append",
        choices=sorted(VARIANTS),
        help="run only these variants (repeatable; default: all)",
    )
    args = parser.parse_args(argv)
    chosen = {name: VARIANTS[name] for name in VARIANTS if name in (args.variant or VARIANTS)}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in chosen}
    for round_ in range(args.rounds):
        for i, (name, settings) in enumerate(chosen.items()):
            out = args.out / f"round{round_}-variant{i}"
            runs[name].append(_run_once(settings, args, out))
            print(f"round {round_ + 1}/{args.rounds}: {name} done", file=sys.stderr, flush=True)
    table = summarize(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablation.md").write_text(table)
    (args.out / "ablation.json").write_text(json.dumps(runs, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
