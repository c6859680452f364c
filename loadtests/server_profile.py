"""Where the orchestrator's Python goes per answer: ``python -m loadtests.server_profile``.

Runs the orchestrator in this process, exactly as ``python -m orchestrator`` does (configured by
the same environment), and profiles its event loop's thread for a window: from ``--start-after``
seconds after start for ``--seconds`` seconds, or from SIGUSR1 to SIGUSR2. When the window
closes it writes the cProfile stats and the pause of every garbage collection in it, prints the
summary, and goes on serving until SIGTERM.

The summary is per answer, counted by :func:`orchestrator.codec.result_to_proto` (once per Score
answer and per ScoreBatch item): Python calls and profiled time by module and by function.
cProfile adds its own cost to every call, so the times are inflated; what it cannot disturb is how
many calls each answer makes. It sees Python functions and the C functions Python calls; the
event loop's and gRPC's own native code, and other threads, are outside it (``py-spy --native``
and ``cascade loadtest``'s per-process CPU cover those). A coroutine counts one call per resumption.

Beside a running ``cascade up`` (the URLs are the ones it prints)::

    CASCADE_REDIS__URL=redis://127.0.0.1:6379/0 CASCADE_NATS__URL=nats://127.0.0.1:4222 \\
    CASCADE_TRITON__URL=127.0.0.1:8001 CASCADE_PSEUDONYM__KEY_FILE=.run/pseudonym.key \\
    CASCADE_SERVER__PORT=50061 CASCADE_DECISION_LOG__SPOOL_DIR=/tmp/profile-spool \\
    python -m loadtests.server_profile --out /tmp/profile --start-after 20 --seconds 20 &
    cascade loadtest --target 127.0.0.1:50061 --rate 300 --duration 40 --serial-count 0 \\
        --no-baseline --no-overload

``python -m loadtests.server_profile --summary /tmp/profile`` prints a written profile again.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cascade.grpc_stack import GRPC_EXPERIMENTS_DEFAULT

ANSWER_FUNCTION: Final = "result_to_proto"
_TOP: Final = 25


@dataclass(slots=True)
class _Window:
    """The profiler and the collections seen while it runs."""

    out: Path
    profile: cProfile.Profile = field(default_factory=cProfile.Profile)
    running: bool = False
    started_s: float = 0.0
    collection_started_s: float = 0.0
    pauses: list[tuple[int, float]] = field(default_factory=list)  # generation, microseconds

    def start(self) -> bool:
        """Open the window; False when it is open or was (a profile covers one window)."""
        if self.running or self.started_s:
            return False
        self.running = True
        self.started_s = time.perf_counter()
        self.profile.enable()
        return True

    def stop(self) -> None:
        if not self.running:
            return
        self.profile.disable()
        self.running = False
        seconds = time.perf_counter() - self.started_s
        self.profile.dump_stats(self.out.with_suffix(".prof"))
        gc_file = self.out.with_suffix(".gc.json")
        gc_file.write_text(json.dumps({"seconds": seconds, "pauses": self.pauses}))
        # This runs in a signal handler on the serving thread: whatever it raised would land in
        # the code the signal interrupted.
        try:
            print(summary(self.out), flush=True)
        except ValueError as exc:
            print(f"wrote {self.out.with_suffix('.prof')}; no summary: {exc}", flush=True)

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if not self.running:
            return
        if phase == "start":
            self.collection_started_s = time.perf_counter()
        else:
            pause_us = (time.perf_counter() - self.collection_started_s) * 1e6
            self.pauses.append((int(info["generation"]), pause_us))


def _where(filename: str) -> str:
    """A short module path: the repository's or site-packages' relative path."""
    for marker in ("site-packages/", f"{Path.cwd()}/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def _module(filename: str, name: str) -> str:
    """What a function is counted under: its package and module, the standard library's
    top-level module, or the built-in itself."""
    where = _where(filename)
    if where == "~":
        return name.split(" of ")[0].strip("<>")  # "built-in method ...", "method 'get'"
    if "/python3." in where and "/" in where.split("/python3.", 1)[1]:
        return "stdlib " + where.split("/python3.", 1)[1].split("/")[1]
    return "/".join(where.split("/")[:2])


@dataclass(frozen=True, slots=True)
class Row:
    """One module's or function's share of an answer."""

    name: str
    calls: float
    own_us: float
    inclusive_us: float = 0.0


@dataclass(frozen=True, slots=True)
class PerAnswer:
    """A profile divided by the answers given in it."""

    answers: int
    calls: float
    own_us: float
    modules: list[Row]
    functions: list[Row]


def per_answer(stats: pstats.Stats, answer_function: str = ANSWER_FUNCTION) -> PerAnswer:
    """Calls and profiled microseconds per answer: in all, by module and by function."""
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, object]]
    raw = stats.stats  # type: ignore[attr-defined]
    answers = sum(v[1] for (_, _, name), v in raw.items() if name == answer_function)
    if not answers:
        raise ValueError(f"no call of {answer_function} in the profile: no answer was given")
    own: dict[str, float] = {}
    calls: dict[str, int] = {}
    functions = []
    for (filename, line, name), (_, n, own_s, inclusive_s, _) in raw.items():
        module = _module(filename, name)
        own[module] = own.get(module, 0.0) + own_s
        calls[module] = calls.get(module, 0) + n
        functions.append(
            Row(
                f"{_where(filename)}:{line} {name}",
                n / answers,
                own_s / answers * 1e6,
                inclusive_s / answers * 1e6,
            )
        )
    modules = [Row(m, calls[m] / answers, s / answers * 1e6) for m, s in own.items()]
    return PerAnswer(
        answers=answers,
        calls=sum(calls.values()) / answers,
        own_us=sum(own.values()) / answers * 1e6,
        modules=sorted(modules, key=lambda r: -r.own_us),
        functions=sorted(functions, key=lambda r: -r.own_us),
    )


def _pause_lines(gc_file: Path) -> list[str]:
    if not gc_file.exists():
        return []
    data = json.loads(gc_file.read_text())
    seconds = data["seconds"]
    lines = []
    for generation in (0, 1, 2):
        pauses = sorted(us for g, us in data["pauses"] if g == generation)
        if pauses:
            p99 = pauses[min(len(pauses) - 1, int(len(pauses) * 0.99))]
            lines.append(
                f"gc generation {generation}: {len(pauses) / seconds:.1f}/s, pause p50 "
                f"{pauses[len(pauses) // 2]:.0f} us, p99 {p99:.0f} us, max {pauses[-1]:.0f} us, "
                f"{sum(pauses) / 1e4 / seconds:.2f}% of the time"
            )
    return lines


def summary(out: Path, top: int = _TOP) -> str:
    """The written profile ``out`` (``.prof`` and ``.gc.json`` beside it) as text."""
    figures = per_answer(pstats.Stats(str(out.with_suffix(".prof"))))
    lines = [
        f"{figures.answers} answers: {figures.calls:.0f} Python calls and "
        f"{figures.own_us:.0f} us of profiled time per answer",
        "",
        "by module (calls, profiled us per answer):",
        *(f"{m.calls:9.1f} {m.own_us:9.1f}  {m.name}" for m in figures.modules[:top]),
        "",
        "by function (calls, own us, with callees us, per answer):",
        *(
            f"{f.calls:9.2f} {f.own_us:9.1f} {f.inclusive_us:9.1f}  {f.name}"
            for f in figures.functions[:top]
        ),
        "",
        *_pause_lines(out.with_suffix(".gc.json")),
    ]
    return "\n".join(lines)


def _serve(window: _Window, start_after_s: float | None, seconds: float | None) -> None:
    """``python -m orchestrator`` in this process, with the window's triggers armed. Signal
    handlers run on the main thread, which is the event loop's: the one the window profiles."""
    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS_DEFAULT)
    from orchestrator.__main__ import main as orchestrator_main  # after GRPC_EXPERIMENTS

    signal.signal(signal.SIGUSR1, lambda *_: window.start())
    signal.signal(signal.SIGUSR2, lambda *_: window.stop())
    gc.callbacks.append(window.on_gc)
    if start_after_s is not None:

        def on_alarm(*_: object) -> None:
            if window.running:
                window.stop()
            elif window.start() and seconds is not None:
                signal.setitimer(signal.ITIMER_REAL, seconds)

        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, start_after_s)
    orchestrator_main()


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.server_profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, help="write OUT.prof and OUT.gc.json")
    parser.add_argument("--start-after", type=float, help="open the window after this many s")
    parser.add_argument("--seconds", type=float, help="close it this many seconds later")
    parser.add_argument("--summary", type=Path, metavar="OUT", help="print a written profile")
    parser.add_argument("--top", type=int, default=_TOP, help="rows per table")
    args = parser.parse_args(argv)
    if args.summary is not None:
        print(summary(args.summary, args.top))
        return 0
    if args.out is None:
        parser.error("--out is needed to profile (or --summary OUT to print one)")
    if args.seconds is not None and args.start_after is None:
        parser.error("--seconds needs --start-after (or open and close the window by signal)")
    _serve(_Window(args.out), args.start_after, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
