"""CPU time per component while a step runs, read from ``/proc`` (Linux).

On a 2-core machine the stack and the generator share the CPU, so "where the time goes" under
load is as much about CPU as about latency: :class:`CpuMeter` sums user + system time of every
process below the generator (the stack it started: orchestrator, screening workers, Redis, NATS,
Triton and its Python-backend stubs, the naive baseline) by role, and of the generator itself
including its reaped children (the spawned generator processes). Take a snapshot before and
after a step; :func:`cpu_report` turns the difference into cores used and CPU milliseconds per
answer. :func:`role_of` (which process is what) is pure.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

__all__ = ["CpuMeter", "cpu_report", "role_of"]

_PROC: Final = Path("/proc")
_TICKS: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_ROLES: Final = (
    ("loadtests.naive server", "naive-server"),
    ("loadtests.naive worker", "naive-workers"),
    ("-m orchestrator", "orchestrator"),
    ("-m stages.screening", "screening-workers"),
    ("redis-server", "redis"),
    ("nats-server", "nats"),
    ("tritonserver", "triton"),
    ("triton_python_backend_stub", "triton"),
    ("multiprocessing", "loadgen"),
)


def role_of(cmdline: Sequence[str]) -> str:
    """The component a process belongs to, from its command line."""
    text = " ".join(cmdline)
    for needle, role in _ROLES:
        if needle in text:
            return role
    return "other"


def _stat(pid: int) -> tuple[int, float, float] | None:
    """(ppid, own CPU seconds, reaped children's CPU seconds) of ``pid``; None if it is gone."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    ppid = int(fields[1])
    own = (int(fields[11]) + int(fields[12])) / _TICKS
    children = (int(fields[13]) + int(fields[14])) / _TICKS
    return ppid, own, children


def _cmdline(pid: int) -> list[str]:
    try:
        return (_PROC / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


class CpuMeter:
    """Snapshots of CPU seconds by role for ``root`` (default: this process) and its subtree."""

    def __init__(self, root: int | None = None) -> None:
        self._root = os.getpid() if root is None else root

    @staticmethod
    def available() -> bool:
        """Whether ``/proc`` can be read (Linux)."""
        return (_PROC / "self" / "stat").exists()

    def snapshot(self) -> dict[str, float]:
        """CPU seconds so far, by role. The root counts as ``loadgen`` with its reaped children."""
        parents: dict[int, int] = {}
        usage: dict[int, float] = {}
        root_stat = _stat(self._root)
        if root_stat is None:
            return {}
        for entry in _PROC.iterdir():
            if not entry.name.isdigit():
                continue
            stat = _stat(int(entry.name))
            if stat is not None:
                parents[int(entry.name)] = stat[0]
                usage[int(entry.name)] = stat[1]
        totals: dict[str, float] = {"loadgen": root_stat[1] + root_stat[2]}
        for pid in usage:
            if pid == self._root or not self._descends(pid, parents):
                continue
            role = role_of(_cmdline(pid))
            totals[role] = totals.get(role, 0.0) + usage[pid]
        return totals

    def _descends(self, pid: int, parents: Mapping[int, int]) -> bool:
        seen = 0
        while pid in parents and seen < 64:
            pid = parents[pid]
            if pid == self._root:
                return True
            seen += 1
        return False


def cpu_report(
    before: Mapping[str, float], after: Mapping[str, float], wall_s: float, answers: int
) -> dict[str, dict[str, float]]:
    """Cores used and CPU ms per answer, by role, between two snapshots (pure)."""
    roles = sorted(set(before) | set(after))
    used = {r: max(0.0, after.get(r, 0.0) - before.get(r, 0.0)) for r in roles}
    total = sum(used.values())
    return {
        "cores": {r: round(used[r] / wall_s, 3) if wall_s > 0 else 0.0 for r in roles}
        | {"total": round(total / wall_s, 3) if wall_s > 0 else 0.0},
        "ms_per_answer": {r: round(1000 * used[r] / answers, 4) if answers else 0.0 for r in roles}
        | {"total": round(1000 * total / answers, 4) if answers else 0.0},
    }
