"""CPU time per component while a step runs, read from ``/proc`` (Linux).

On a 2-core machine the stack and the generator share the CPU, so "where the time goes" under
load is as much about CPU as about latency: :class:`CpuMeter` sums user + system time of every
process below the generator (the stack it started: orchestrator, screening workers, Redis, NATS,
Triton and its Python-backend stubs, the naive baseline) by role, and of the generator itself
including its reaped children (the spawned generator processes). Take a snapshot before and
after a step; :func:`cpu_report` turns the difference into cores used and CPU milliseconds per
answer. :func:`role_of` (which process is what) is pure.

Beside the CPU it reads the scheduler's own accounting (``/proc/PID/task/*/schedstat``): how
often each role's threads were scheduled in and how long they waited on a run queue before they
ran. Per answer, the first counts the wake-ups (hand-offs) a call costs and the second the
latency that contention for the cores adds to it, which is what makes a loaded 2-core machine
slower per call than one call at a time.

It also reads the machine's own counters (``/proc/stat``): the time the host ran something else
while this virtual machine's cores wanted to run (*steal*). On a shared host that is what makes
one hour several times slower than the next for the same commit, and the report sets it beside
every step.

Roles with several processes (the screening workers) are also kept per process, so a report can
show each worker beside their sum. When two stacks run under the generator (the current one and a
compared checkout's, see :mod:`loadtests.compare`), each gets its own meter: ``stack_root`` picks
the subtree a meter counts and ``skip`` leaves out another stack's subtree; the generator
(``loadgen``, the root with its reaped children) is counted by every meter.

:func:`idle_settings` reads what an idle core does on this machine (the cpuidle driver and guest
halt polling), which the report records beside the CPU figures: on a virtual machine whose idle
cores halt, work that follows an idle gap runs cold and costs several times its CPU
(:mod:`loadtests.idle_penalty`).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

__all__ = [
    "LOADGEN",
    "PER_PROCESS_ROLES",
    "CpuMeter",
    "CpuSnapshot",
    "busy_and_steal_s",
    "cpu_report",
    "describe_idle",
    "idle_settings",
    "machine_times",
    "process_cpu_s",
    "role_of",
    "steal_share",
]

_PROC: Final = Path("/proc")
_TICKS: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_ROLES: Final = (
    ("loadtests.naive server", "naive-server"),
    ("loadtests.naive worker", "naive-workers"),
    ("-m loadtests.grpc_floor", "grpc-floor"),
    ("-m orchestrator", "orchestrator"),
    ("-m stages.screening", "screening-workers"),
    ("redis-server", "redis"),
    ("nats-server", "nats"),
    ("tritonserver", "triton"),
    ("triton_python_backend_stub", "triton"),
    ("multiprocessing", "loadgen"),
)
LOADGEN: Final = "loadgen"
PER_PROCESS_ROLES: Final = frozenset({"orchestrator", "screening-workers", "naive-workers"})


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


def process_cpu_s(pid: int) -> float:
    """CPU seconds ``pid`` has used so far (user + system, its threads included); 0.0 if gone."""
    stat = _stat(pid)
    return 0.0 if stat is None else stat[1]


def _schedstat(pid: int) -> tuple[float, int]:
    """(seconds waited on a run queue, times scheduled in), summed over ``pid``'s threads
    (``schedstat`` holds run ns, wait ns, timeslices); (0.0, 0) where none can be read."""
    try:
        tasks = list((_PROC / str(pid) / "task").iterdir())
    except OSError:
        return 0.0, 0
    wait_ns = slices = 0
    for task in tasks:
        try:
            fields = (task / "schedstat").read_text().split()
        except OSError:
            continue
        if len(fields) >= 3:
            wait_ns += int(fields[1])
            slices += int(fields[2])
    return wait_ns / 1e9, slices


_MACHINE_FIELDS: Final = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
_BUSY_FIELDS: Final = ("user", "nice", "system", "irq", "softirq")


def machine_times(stat: Path = _PROC / "stat") -> dict[str, float]:
    """Seconds every core of this machine spent so far in each state of ``/proc/stat``'s first
    line (user, system, idle, ..., steal: the time the host ran something else while a core of
    this virtual machine wanted to run); empty where it cannot be read."""
    try:
        first = stat.read_text().split("\n", 1)[0].split()
    except OSError:
        return {}
    if len(first) < 1 + len(_MACHINE_FIELDS) or first[0] != "cpu":
        return {}
    return {name: int(v) / _TICKS for name, v in zip(_MACHINE_FIELDS, first[1:], strict=False)}


def _cmdline(pid: int) -> list[str]:
    try:
        return (_PROC / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    """CPU seconds so far by role, and per process (``"PID"``) for :data:`PER_PROCESS_ROLES`;
    run-queue wait seconds and times scheduled in by role (empty where ``schedstat`` is not
    kept); the whole machine's :func:`machine_times`."""

    roles: Mapping[str, float] = field(default_factory=dict)
    processes: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    waits: Mapping[str, float] = field(default_factory=dict)
    switches: Mapping[str, int] = field(default_factory=dict)
    machine: Mapping[str, float] = field(default_factory=dict)


class CpuMeter:
    """Snapshots of CPU seconds by role for ``root`` (default: this process) and a subtree.

    The stack counted is the subtree of ``stack_root`` (default ``root``) without the subtrees of
    ``skip``; ``root``'s own CPU and its reaped children count as ``loadgen``.
    """

    def __init__(
        self,
        root: int | None = None,
        *,
        stack_root: int | None = None,
        skip: Collection[int] = (),
    ) -> None:
        self._root = os.getpid() if root is None else root
        self._stack_root = self._root if stack_root is None else stack_root
        self._skip = frozenset(skip)

    @staticmethod
    def available() -> bool:
        """Whether ``/proc`` can be read (Linux)."""
        return (_PROC / "self" / "stat").exists()

    def snapshot(self) -> CpuSnapshot:
        """CPU seconds so far, by role (and per process where a role has several)."""
        parents: dict[int, int] = {}
        usage: dict[int, float] = {}
        root_stat = _stat(self._root)
        if root_stat is None:
            return CpuSnapshot()
        for entry in _PROC.iterdir():
            if not entry.name.isdigit():
                continue
            stat = _stat(int(entry.name))
            if stat is not None:
                parents[int(entry.name)] = stat[0]
                usage[int(entry.name)] = stat[1]
        totals: dict[str, float] = {LOADGEN: root_stat[1] + root_stat[2]}
        processes: dict[str, dict[str, float]] = {}
        waits: dict[str, float] = {}
        switches: dict[str, int] = {}

        def add_sched(role: str, pid: int) -> None:
            wait_s, slices = _schedstat(pid)
            if slices:
                waits[role] = waits.get(role, 0.0) + wait_s
                switches[role] = switches.get(role, 0) + slices

        add_sched(LOADGEN, self._root)
        for pid in usage:
            if pid == self._root or not self._counted(pid, parents):
                continue
            role = role_of(_cmdline(pid))
            if pid == self._stack_root and role == "other":
                role = "supervisor"
            totals[role] = totals.get(role, 0.0) + usage[pid]
            add_sched(role, pid)
            if role in PER_PROCESS_ROLES:
                processes.setdefault(role, {})[str(pid)] = usage[pid]
        return CpuSnapshot(totals, processes, waits, switches, machine_times())

    def _counted(self, pid: int, parents: Mapping[int, int]) -> bool:
        """Whether ``pid`` is ``stack_root`` or below it, and not below a skipped process."""
        seen = 0
        while seen < 64:
            if pid in self._skip:
                return False
            if pid == self._stack_root:
                return True
            if pid not in parents:
                return False
            pid = parents[pid]
            seen += 1
        return False


def _per_answer_ms(seconds: float, answers: int) -> float:
    return round(1000 * seconds / answers, 4) if answers else 0.0


def cpu_report(
    before: CpuSnapshot,
    after: CpuSnapshot,
    wall_s: float,
    answers: int,
    *,
    stack_roles: Collection[str] | None = None,
) -> dict[str, Any]:
    """Cores used and CPU ms per answer, by role, between two snapshots (pure).

    ``total`` is everything measured, ``stack`` the roles in ``stack_roles`` (default: all but the
    generator), and ``per_process_ms_per_answer`` each process of a role with several (a process
    that started or ended between the snapshots counts what it used while seen). Where both
    snapshots hold scheduler counts, ``sched`` has, by role and for the stack, the times
    scheduled in (``switches_per_answer``) and the run-queue wait (``rq_wait_ms_per_answer``)
    per answer. Where both hold the machine's times, ``machine`` has the cores busy and the
    cores the host stole (``steal_cores``), the stolen share of the time the cores wanted to run
    (``steal_share``: steal / (busy + steal)) and the stolen ms per answer.
    """
    roles = sorted(set(before.roles) | set(after.roles))
    used = {r: max(0.0, after.roles.get(r, 0.0) - before.roles.get(r, 0.0)) for r in roles}
    total = sum(used.values())
    in_stack = [r for r in roles if (r in stack_roles if stack_roles is not None else r != LOADGEN)]
    stack = sum(used[r] for r in in_stack)

    def cores(seconds: float) -> float:
        return round(seconds / wall_s, 3) if wall_s > 0 else 0.0

    per_process: dict[str, dict[str, float]] = {}
    for role, now in sorted(after.processes.items()):
        then = before.processes.get(role, {})
        per_process[role] = {
            pid: _per_answer_ms(max(0.0, seconds - then.get(pid, 0.0)), answers)
            for pid, seconds in sorted(now.items())
        }
    # No stack process seen (a --target stack this meter does not own): no stack figure at all,
    # rather than a 0 that reads as "met".
    stack_cores = {"stack": cores(stack)} if in_stack else {}
    stack_ms = {"stack": _per_answer_ms(stack, answers)} if in_stack else {}
    report: dict[str, Any] = {
        "cores": {r: cores(used[r]) for r in roles} | stack_cores | {"total": cores(total)},
        "ms_per_answer": {r: _per_answer_ms(used[r], answers) for r in roles}
        | stack_ms
        | {"total": _per_answer_ms(total, answers)},
        "per_process_ms_per_answer": per_process,
        "stack_roles": in_stack,
    }
    if before.switches and after.switches and answers:
        sched_roles = sorted(set(after.switches) & set(before.switches))
        waited = {r: max(0.0, after.waits[r] - before.waits[r]) for r in sched_roles}
        slices = {r: max(0, after.switches[r] - before.switches[r]) for r in sched_roles}
        stack_sched = [r for r in sched_roles if r in in_stack]
        report["sched"] = {
            "switches_per_answer": {r: round(slices[r] / answers, 2) for r in sched_roles}
            | (
                {"stack": round(sum(slices[r] for r in stack_sched) / answers, 2)}
                if in_stack
                else {}
            ),
            "rq_wait_ms_per_answer": {r: _per_answer_ms(waited[r], answers) for r in sched_roles}
            | (
                {"stack": _per_answer_ms(sum(waited[r] for r in stack_sched), answers)}
                if in_stack
                else {}
            ),
        }
    if before.machine and after.machine:
        report["machine"] = _machine_report(before.machine, after.machine, wall_s, answers)
    return report


def busy_and_steal_s(
    before: Mapping[str, float], after: Mapping[str, float]
) -> tuple[float, float]:
    """Core-seconds busy and stolen by the host between two :func:`machine_times` readings."""

    def spent(names: Sequence[str]) -> float:
        return sum(max(0.0, after.get(n, 0.0) - before.get(n, 0.0)) for n in names)

    return spent(_BUSY_FIELDS), spent(("steal",))


def steal_share(before: Mapping[str, float], after: Mapping[str, float]) -> float | None:
    """steal / (busy + steal) between two :func:`machine_times` readings; None with neither."""
    busy, steal = busy_and_steal_s(before, after)
    return steal / (busy + steal) if busy + steal > 0 else None


def _machine_report(
    before: Mapping[str, float], after: Mapping[str, float], wall_s: float, answers: int
) -> dict[str, float | None]:
    busy, steal = busy_and_steal_s(before, after)
    share = steal_share(before, after)
    return {
        "busy_cores": round(busy / wall_s, 3) if wall_s > 0 else 0.0,
        "steal_cores": round(steal / wall_s, 3) if wall_s > 0 else 0.0,
        "steal_share": round(share, 4) if share is not None else None,
        "steal_ms_per_answer": _per_answer_ms(steal, answers),
    }


_SYS: Final = Path("/sys")
_IDLE_FILES: Final = {
    "cpuidle_driver": "devices/system/cpu/cpuidle/current_driver",
    "cpuidle_governor": "devices/system/cpu/cpuidle/current_governor_ro",
    "guest_halt_poll_ns": "module/haltpoll/parameters/guest_halt_poll_ns",
}


def idle_settings(sys_root: Path = _SYS) -> dict[str, str | None]:
    """What an idle core does here: the cpuidle driver and governor, and how long a halting guest
    core polls first (``guest_halt_poll_ns``; 0: it halts at once). ``None`` where not exposed."""
    settings: dict[str, str | None] = {}
    for name, relative in _IDLE_FILES.items():
        try:
            settings[name] = (sys_root / relative).read_text().strip()
        except OSError:
            settings[name] = None
    return settings


def describe_idle(settings: Mapping[str, str | None]) -> str:
    """One line for a report: the settings, and what halt polling at 0 means."""
    driver = settings.get("cpuidle_driver") or "unknown"
    poll = settings.get("guest_halt_poll_ns")
    line = f"cpuidle driver {driver}"
    if settings.get("cpuidle_governor"):
        line += f", governor {settings['cpuidle_governor']}"
    if poll is not None:
        line += f", guest halt polling {poll} ns"
        if poll == "0":
            line += " (an idle core halts at once; `python -m loadtests.idle_penalty` measures what the work after an idle gap costs then)"
    return line
