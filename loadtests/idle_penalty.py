"""What idling costs on this machine: the same per-answer work, run after idle gaps of each length.

``python -m loadtests.idle_penalty`` times two pieces of one answer's work in this process, with
nothing else of the stack running:

* ``screening model``: one row through the champion's stage-1 ONNX model, as a screening worker
  scores it;
* ``stage-1 features``: a 64-entry stored card history decoded and the screening features computed
  from it, as the orchestrator does for every Score call.

Each is run back to back (gap 0) and then after sleeping each gap before every run; the table
gives the median and p90 wall time per run, the mean CPU time per run (``thread_time``) and the
median's ratio to back to back. On a virtual machine whose idle cores halt (``haltpoll`` with
guest halt polling off), the host may run other work on the core while ours sleeps: the first
instructions after the gap then find the caches and branch predictors cold, and the same work
takes several times as long and as much CPU. In ``cascade loadtest`` every process of the stack
idles between the hops of a call at a few hundred calls a second, so this penalty is part of every
CPU-per-answer and low-rate latency figure, and it shrinks as the load rises and the gaps close.

:func:`loadtests.cpu.idle_settings` reads what decides it (the cpuidle driver and governor, and
``guest_halt_poll_ns``); ``cascade loadtest`` records the same in its report.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

import numpy as np

from cascade.model_registry import load_registry
from cascade.settings import DEFAULT_MODEL_DIR
from loadtests.cpu import describe_idle, idle_settings
from loadtests.machine_speed import features_workload
from stages.screening.model import ScreeningModel

DEFAULT_GAPS_MS: Final = (0.0, 0.5, 1.0, 3.0, 7.0, 20.0)


@dataclass(frozen=True, slots=True)
class GapResult:
    """One workload after one idle gap."""

    workload: str
    gap_ms: float
    runs: int
    wall_p50_us: float
    wall_p90_us: float
    cpu_mean_us: float
    ratio_to_back_to_back: float


def summarize(
    workload: str, gap_ms: float, walls_s: Sequence[float], cpus_s: Sequence[float], base_us: float
) -> GapResult:
    """The row for ``walls_s``/``cpus_s`` (seconds per run); ``base_us`` is the back-to-back
    median wall time the ratio is taken against (this row's own median when it is that row)."""
    if not walls_s or len(walls_s) != len(cpus_s):
        raise ValueError("need one wall and one CPU time per run, and at least one run")
    ordered = sorted(walls_s)
    p50_us = statistics.median(ordered) * 1e6
    p90_us = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))] * 1e6
    base = base_us if base_us > 0 else p50_us
    return GapResult(
        workload=workload,
        gap_ms=gap_ms,
        runs=len(walls_s),
        wall_p50_us=round(p50_us, 1),
        wall_p90_us=round(p90_us, 1),
        cpu_mean_us=round(statistics.fmean(cpus_s) * 1e6, 1),
        ratio_to_back_to_back=round(p50_us / base, 2),
    )


def measure(
    workload: str,
    run: Callable[[], object],
    gaps_ms: Sequence[float],
    *,
    runs: int,
    warmup: int,
) -> list[GapResult]:
    """``run`` timed ``runs`` times after each gap (after ``warmup`` untimed runs per gap)."""
    results: list[GapResult] = []
    base_us = 0.0
    for gap_ms in gaps_ms:
        gap_s = gap_ms / 1000.0
        walls: list[float] = []
        cpus: list[float] = []
        for i in range(warmup + runs):
            if gap_s > 0:
                time.sleep(gap_s)
            cpu0 = time.thread_time()
            wall0 = time.perf_counter()
            run()
            wall = time.perf_counter() - wall0
            cpu = time.thread_time() - cpu0
            if i >= warmup:
                walls.append(wall)
                cpus.append(cpu)
        row = summarize(workload, gap_ms, walls, cpus, base_us)
        if not results:
            base_us = row.wall_p50_us
        results.append(row)
    return results


def workloads(model_dir: Path) -> dict[str, Callable[[], object]]:
    """The two timed pieces of an answer's work (see the module docstring)."""
    champion = load_registry(model_dir).champion()
    model = ScreeningModel(champion.stage1_path, version=champion.stage1.version)
    model.warm()
    row = np.zeros((1, model.n_features), dtype=np.float32)
    return {"screening model": lambda: model.predict(row), "stage-1 features": features_workload()}


def table(results: Sequence[GapResult]) -> str:
    """A Markdown table of ``results``."""
    lines = [
        "| workload | idle gap ms | runs | wall p50 us | wall p90 us | CPU mean us | p50 / back to back |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.workload} | {r.gap_ms:g} | {r.runs} | {r.wall_p50_us:.1f} | "
            f"{r.wall_p90_us:.1f} | {r.cpu_mean_us:.1f} | {r.ratio_to_back_to_back:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m loadtests.idle_penalty", description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument(
        "--gaps-ms", type=float, nargs="+", default=list(DEFAULT_GAPS_MS), help="idle gaps; 0 first"
    )
    parser.add_argument("--runs", type=int, default=300, help="timed runs per gap")
    parser.add_argument("--warmup", type=int, default=30, help="untimed runs per gap")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or any(g < 0 for g in args.gaps_ms):
        parser.error("--runs must be >= 1, --warmup >= 0 and every gap >= 0")
    settings = idle_settings()
    results: list[GapResult] = []
    for name, run in workloads(args.model_dir).items():
        results.extend(measure(name, run, args.gaps_ms, runs=args.runs, warmup=args.warmup))
    print(f"machine idle: {describe_idle(settings)}\n")
    print(table(results))
    if args.out is not None:
        payload = {"idle": settings, "results": [asdict(r) for r in results]}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
