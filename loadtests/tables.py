"""Plain-text and Markdown tables of a report (pure), for the terminal and ``docs/latency.md``.

Tables: every step (serial, open-loop and overload) with latency and answer shares; the latency
of each path an answer took (stage 1, escalated, cache, default); per stage;
CPU per answer by process for every step, with the issue's CPU targets beside it; the overload
step; the comparisons (naive baseline, a compared ref); the goals.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from loadtests.cpu import describe_idle
from loadtests.report import FLOOR_NAME, Goals, common_rate

__all__ = ["markdown_tables", "text_table"]

_STAGES = (
    "redis",
    "features",
    "stage1",
    "stage2",
    "orchestrator",
    "transport",
    "front",
    "legs",
    "server_total",
)


def _steps(report: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    rows: list[tuple[str, Mapping[str, Any]]] = []
    for name, target in report["targets"].items():
        if target.get("serial"):
            rows.append((name, target["serial"]))
        rows += [(name, s) for s in sorted(target["steps"], key=lambda s: s["offered_rate"])]
        if target.get("overload"):
            rows.append((name, target["overload"]))
    return rows


def _offered(step: Mapping[str, Any]) -> str:
    if step["mode"] == "serial":
        return "1 in flight"
    if step["mode"] == "overload":
        return f"{step['offered_rate']:g} (overload)"
    return f"{step['offered_rate']:g}"


def _step_cells(name: str, step: Mapping[str, Any]) -> list[str]:
    lat, rates = step["latency_ms"], step["rates"]
    return [
        name,
        _offered(step),
        f"{step['achieved_rate']:.0f}",
        *(f"{lat[k]:.2f}" for k in ("p50", "p95", "p99", "p99_9", "max")),
        f"{step['send_lag_ms']['p99']:.2f}",
        f"{rates['slo_attainment']:.2%}",
        f"{rates['error'] + rates['timeout']:.2%}",
        f"{rates['fallback']:.2%}",
        _share(rates.get("degraded_share")),
        _share(rates.get("shed")),
        f"{rates['escalation']:.1%}",
        f"{rates['cache_hit']:.1%}",
        "yes" if step["passed"] else "no",
    ]


_STEP_HEADER = [
    "target",
    "offered/s",
    "achieved/s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "p99.9 ms",
    "max ms",
    "gen lag p99",
    "in budget",
    "err+timeout",
    "fallback",
    "degraded",
    "shed",
    "escalated",
    "cache hits",
    "at SLO",
]


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _stage_rows(report: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for name, label, step in _picked_steps(report):
        cells = [name, label]
        for stage in _STAGES:
            summary = step["stages_ms"].get(stage)  # reports before a stage was split lack it
            cells.append(
                f"{summary['p50']:.3f} / {summary['p99']:.3f}"
                if summary and summary["count"]
                else "-"
            )
        rows.append(cells)
    return rows


# Who decided the answer (the reply's decided_by), the columns of the per-path table.
_PATHS: Final = (
    ("STAGE1", "stage 1"),
    ("STAGE2", "stage 2 (escalated)"),
    ("CACHE", "output cache"),
    ("DEFAULT", "default"),
)


def _path_rows(report: Mapping[str, Any]) -> list[list[str]]:
    """Every step: each path's share of the answers and its latency, so that an end-to-end p99
    reads as the tail of a mix (a few percent of escalated calls set it at low rates)."""
    rows = []
    for name, step in _steps(report):
        by_path = step.get("by_path_ms", {})
        answers = sum(summary["count"] for summary in by_path.values())
        cells = [name, _offered(step)]
        for path, _ in _PATHS:
            summary = by_path.get(path)
            cells.append(
                f"{summary['count'] / answers:.1%}: {summary['p50']:.2f} / {summary['p99']:.2f}"
                if summary and summary["count"]
                else "-"
            )
        rows.append(cells)
    return rows


_PATH_HEADER = ["target", "step", *(label for _, label in _PATHS)]
_PATH_TITLE = "By who decided the answer: share of the answers, then latency p50 / p99, ms"


def _picked_steps(report: Mapping[str, Any]) -> list[tuple[str, str, Mapping[str, Any]]]:
    """Per target: the serial step, the capacity step, and the step at the highest rate every
    target ran unsaturated (else its fastest step)."""
    common = common_rate(report)
    picks = []
    for name, target in report["targets"].items():
        if target.get("serial"):
            picks.append((name, "1 in flight", target["serial"]))
        cap = target.get("capacity")
        steps = [s for s in target["steps"] if s["mode"] == "open"]
        cap_step = next((s for s in steps if cap and s["label"] == cap["label"]), None)
        if cap_step is not None:
            picks.append((name, f"@{cap_step['offered_rate']:g}/s (capacity)", cap_step))
        same = [s for s in steps if s["offered_rate"] == common]
        if same and same[0] is not cap_step:
            picks.append((name, f"@{common:g}/s (common)", same[0]))
        elif not same and cap_step is None and steps:
            step = max(steps, key=lambda s: s["offered_rate"])
            picks.append((name, f"@{step['offered_rate']:g}/s", step))
    return picks


_CPU_HEADER = [
    "target",
    "step",
    "orchestrator",
    "screening total",
    "screening each",
    "triton",
    "redis",
    "nats",
    "generator",
    "stack",
    "stack cores",
    "total",
]


def _ms(cpu: Mapping[str, Any], role: str) -> str:
    value = cpu["ms_per_answer"].get(role)
    return "-" if value is None else f"{value:.3f}"


def _server_roles(target: str) -> tuple[str, str]:
    """The roles in a target's orchestrator and screening columns: the naive baseline's server
    and workers for it."""
    if target == "naive":
        return "naive-server", "naive-workers"
    if target == FLOOR_NAME:
        return FLOOR_NAME, "-"  # no workers: its screening column stays empty
    return "orchestrator", "screening-workers"


def _cpu_rows(report: Mapping[str, Any]) -> list[list[str]]:
    """CPU ms per answer of every step, by process role. The naive baseline's server and
    workers go in the orchestrator and screening columns."""
    rows = []
    for name, step in _steps(report):
        cpu = step.get("cpu")
        if not cpu:
            continue
        server, workers = _server_roles(name)
        per_process = cpu.get("per_process_ms_per_answer", {})
        each = per_process.get(workers, {})
        servers = per_process.get(server, {})
        server_cell = _ms(cpu, server)
        if len(servers) > 1:  # several processes on one port: how the load spread over them
            server_cell += " (" + " / ".join(f"{v:.3f}" for v in servers.values()) + ")"
        rows.append(
            [
                name,
                _offered(step),
                server_cell,
                _ms(cpu, workers),
                " / ".join(f"{v:.3f}" for v in each.values()) or "-",
                _ms(cpu, "triton"),
                _ms(cpu, "redis"),
                _ms(cpu, "nats"),
                _ms(cpu, "loadgen"),
                _ms(cpu, "stack"),
                f"{cpu['cores']['stack']:.2f}" if "stack" in cpu["cores"] else "-",
                _ms(cpu, "total"),
            ]
        )
    return rows


_SCHED_HEADER: Final = [
    "target",
    "step",
    "orchestrator",
    "screening",
    "triton",
    "redis",
    "nats",
    "generator",
    "stack",
    "stolen by the host",
]
_SCHED_LINE: Final = (
    "Wake-ups (times scheduled in) / run-queue wait ms, per answer, every step "
    "(/proc/PID/task/*/schedstat; the wait is latency that contention for the cores adds); "
    "stolen by the host: the share of the time this machine's cores wanted to run that the host "
    "ran something else / those ms per answer (/proc/stat's steal; a shared host's noise):"
)


def _sched_cell(sched: Mapping[str, Any], role: str) -> str:
    switches = sched["switches_per_answer"].get(role)
    wait = sched["rq_wait_ms_per_answer"].get(role)
    return "-" if switches is None or wait is None else f"{switches:.1f} / {wait:.3f}"


def _sched_rows(report: Mapping[str, Any]) -> list[list[str]]:
    """Wake-ups and run-queue wait per answer of every step that has them, by role."""
    rows = []
    for name, step in _steps(report):
        sched = (step.get("cpu") or {}).get("sched")
        if not sched:
            continue
        server, workers = _server_roles(name)
        roles = (server, workers, "triton", "redis", "nats", "loadgen", "stack")
        stolen = _stolen_cell((step.get("cpu") or {}).get("machine"))
        rows.append([name, _offered(step), *(_sched_cell(sched, r) for r in roles), stolen])
    return rows


def _stolen_cell(machine: Mapping[str, Any] | None) -> str:
    if not machine or machine.get("steal_share") is None:
        return "-"
    return f"{100 * machine['steal_share']:.1f}% / {machine['steal_ms_per_answer']:.3f}"


def _sched_part(report: Mapping[str, Any], *, markdown: bool) -> list[str]:
    rows = _sched_rows(report)
    if not rows:
        return []
    return [
        _SCHED_LINE,
        *([""] if markdown else []),
        _render(_SCHED_HEADER, rows, markdown=markdown),
        "",
    ]


def _cpu_targets_line() -> str:
    g = Goals()
    return (
        f"targets at {g.cpu_rate:g}/s: orchestrator <= {g.orchestrator_cpu_ms:g} ms, each "
        f"screening answer <= {g.screening_cpu_ms:g} ms, whole stack <= {g.stack_cpu_ms:g} ms "
        "(stack: the target's own processes and the shared Redis, NATS and Triton; the generator "
        "is apart)"
    )


_OVERLOAD_HEADER = [
    "target",
    "offered/s",
    "achieved/s",
    "sent",
    "answers",
    "shed",
    "stage2 overloaded",
    "other degraded",
    "unlabelled",
    "late (> deadline + 2 ms)",
    "DEADLINE_EXCEEDED",
    "other failures",
    "unsent",
    "p50 ms",
    "p99 ms",
    "max ms",
]


def _overload_rows(report: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for name, target in report["targets"].items():
        step = target.get("overload")
        if not step:
            continue
        o = step["summary"]
        rows.append(
            [
                name,
                f"{o['offered_rate']:g}",
                f"{o['achieved_rate']:.0f}",
                *(
                    str(o[k])
                    for k in (
                        "sent",
                        "answers",
                        "shed",
                        "stage2_overloaded",
                        "degraded_other",
                        "unlabelled_fallbacks",
                        "late",
                        "deadline_exceeded",
                        "other_failures",
                        "unsent",
                    )
                ),
                *(f"{o['latency_ms'][k]:.2f}" for k in ("p50", "p99", "max")),
            ]
        )
    return rows


def _overload_part(report: Mapping[str, Any], title: str, *, markdown: bool) -> list[str]:
    rows = _overload_rows(report)
    if not rows:
        return []
    return [title, _render(_OVERLOAD_HEADER, rows, markdown=markdown), ""]


def _machine_lines(report: Mapping[str, Any]) -> list[str]:
    meta = report.get("meta", {})
    idle = meta.get("idle")
    lines = [f"machine idle: {describe_idle(idle)}"] if idle else []
    speed = meta.get("machine_speed")
    if speed:
        start, end = speed["start"], speed["end"]
        lines.append(
            f"machine speed ({speed['workload']}, the same code all run long): p50 "
            f"{start['wall_p50_us']:g} us before the first step, {end['wall_p50_us']:g} us "
            f"after the last"
        )
    return lines


def _history_lines(report: Mapping[str, Any]) -> list[str]:
    meta = report.get("meta", {}).get("history")
    if not meta:
        return []
    lines = [
        f"card history: {meta['mode']}; {meta['backfilled_transactions']} earlier transactions "
        f"of {meta['backfilled_cards']} cards backfilled with ScoreBatch into every target"
    ]
    for name, target in report["targets"].items():
        seen = (target.get("history") or {}).get("seen_by_load") or {}
        fill = (target.get("history") or {}).get("backfill") or {}
        if seen.get("count"):
            lines.append(
                f"{name}: history length at send (planned) min {seen['min']}, p50 {seen['p50']},"
                f" max {seen['max']}, full {seen['full_share']:.1%} of {seen['count']} fresh "
                f"transactions" + (f"; backfill took {fill['seconds']} s" if fill else "")
            )
    return lines


def _render(
    header: list[str], rows: list[list[str]], *, markdown: bool, text_last: bool = False
) -> str:
    """A table; in terminal text columns align right, but with ``text_last`` the last column
    (prose) aligns left and is not padded."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    cells = [f"{{:>{w}}}" for w in widths]
    if text_last:
        cells[-1] = "{}"
    fmt = "  ".join(cells)
    return "\n".join(fmt.format(*row).rstrip() for row in [header, *rows])


def _pair_lines(comp: Mapping[str, Any]) -> list[str]:
    first, second = comp.get("names") or ("cascade", "naive")
    lines = []
    cap = comp.get("capacity_rate")
    if cap is not None:
        lines.append(
            f"capacity at SLO: {first} {cap[first]}/s, {second} {cap[second]}/s, "
            f"ratio {cap['ratio']}x"
        )
    for key, row in comp.get("capacity_by_p99_ms", {}).items():
        lines.append(
            f"capacity at p99 <= {key} ms (and every answer in budget): {first} "
            f"{row[first]}/s, {second} {row[second]}/s, ratio {row['ratio']}x"
        )
    serial = comp.get("serial_latency")
    if serial:
        lines.append(
            "1 in flight: "
            + ", ".join(
                f"{k} {first} {v[f'{first}_ms']:.2f} ms vs {second} {v[f'{second}_ms']:.2f} ms "
                f"({v['ratio']}x)"
                for k, v in serial.items()
            )
        )
    for row in comp.get("same_rate", []):
        p50, p99 = row["p50"], row["p99"]
        lines.append(
            f"@{row['rate']:g}/s: p50 {p50[f'{first}_ms']:.2f} vs {p50[f'{second}_ms']:.2f} "
            f"ms ({p50['ratio']}x), p99 {p99[f'{first}_ms']:.2f} vs "
            f"{p99[f'{second}_ms']:.2f} ms ({p99['ratio']}x)"
        )
    return lines


def _comparison_lines(report: Mapping[str, Any]) -> list[str]:
    lines = _pair_lines(report["comparison"]) if report.get("comparison") else []
    for name, target in report["targets"].items():
        floor = (target.get("serial") or {}).get("grpc_floor_ms")
        if floor:
            lines.append(
                f"gRPC floor ({name}, health Check, 1 in flight): p50 {floor['p50']:.2f} ms, "
                f"p99 {floor['p99']:.2f} ms"
            )
    lines += _floor_lines(report)
    ref = report.get("comparison_with_ref")
    if ref:
        about = report.get("meta", {}).get("compare") or {}
        lines.append(
            f"side by side with {about.get('ref', '?')} ({str(about.get('commit', ''))[:12]}), "
            "'compare' in the tables:"
        )
        lines += _pair_lines(ref)
    return lines


def _floor_lines(report: Mapping[str, Any]) -> list[str]:
    """The orchestrator's CPU per answer beside the gRPC floor server's, step for step (the steps
    both targets ran at the same offered rate)."""
    targets = report["targets"]
    if FLOOR_NAME not in targets or "cascade" not in targets:
        return []

    def by_rate(name: str) -> dict[float, float]:
        out = {}
        role, _ = _server_roles(name)
        for step in targets[name].get("steps", []):
            ms = (step.get("cpu") or {}).get("ms_per_answer", {})
            if step.get("mode") == "open" and role in ms:
                out[float(step["offered_rate"])] = float(ms[role])
        return out

    floor, cascade = by_rate(FLOOR_NAME), by_rate("cascade")
    lines = []
    for rate in sorted(set(floor) & set(cascade)):
        own, base = cascade[rate], floor[rate]
        share = f"{base / own:.0%}" if own > 0 else "-"
        lines.append(
            f"@{rate:g}/s: orchestrator {own:.3f} ms of CPU per answer, of which the gRPC floor "
            f"server's {base:.3f} ms ({share}); the product's own work {own - base:.3f} ms"
        )
    return lines


def _goal_part(report: Mapping[str, Any], *, markdown: bool) -> str:
    """The goals with what was measured and, when the gRPC floor ran, the floor's own figure
    for the same measurement beside it (the part that gRPC and the machine cost alone)."""
    goals = report.get("goals", [])
    with_floor = any("floor" in goal for goal in goals)
    with_why = any(goal.get("why") for goal in goals)
    rows = []
    for goal in goals:
        measured = goal["measured"]
        row = [goal["goal"], "-" if measured is None else f"{measured:g}"]
        if with_floor:
            on_floor = goal.get("floor")
            row.append("" if on_floor is None else f"{on_floor:g}")
        row.append({True: "met", False: "NOT met", None: "not measured"}[goal["met"]])
        if with_why:
            row.append("; ".join(goal.get("why") or []))
        rows.append(row)
    header = [
        "goal",
        "measured",
        *(["gRPC floor"] if with_floor else []),
        "",
        *(["measured besides the product"] if with_why else []),
    ]
    return _render(header, rows, markdown=markdown, text_last=with_why)


def text_table(report: Mapping[str, Any]) -> str:
    """The whole report as terminal text: steps, stages, comparison, goals."""
    stage_header = ["target", "step", *(f"{s} p50/p99" for s in _STAGES)]
    parts = [
        _render(_STEP_HEADER, [_step_cells(n, s) for n, s in _steps(report)], markdown=False),
        "",
        _PATH_TITLE.lower() + ":",
        _render(_PATH_HEADER, _path_rows(report), markdown=False),
        "",
        "per stage, ms (p50 / p99):",
        _render(stage_header, _stage_rows(report), markdown=False),
        "",
        "CPU per answer, ms, every step; " + _cpu_targets_line() + ":",
        _render(_CPU_HEADER, _cpu_rows(report), markdown=False),
        "",
        *_sched_part(report, markdown=False),
        *_overload_part(report, "overload step:", markdown=False),
        *_machine_lines(report),
        *_history_lines(report),
        *_comparison_lines(report),
        "",
        _goal_part(report, markdown=False),
    ]
    return "\n".join(parts)


def markdown_tables(report: Mapping[str, Any]) -> str:
    """The same tables in Markdown, for ``docs/latency.md``."""
    stage_header = ["target", "step", *(f"{s} p50 / p99" for s in _STAGES)]
    parts = [
        _render(_STEP_HEADER, [_step_cells(n, s) for n, s in _steps(report)], markdown=True),
        "",
        _PATH_TITLE + ":",
        "",
        _render(_PATH_HEADER, _path_rows(report), markdown=True),
        "",
        "Per stage, ms (p50 / p99):",
        "",
        _render(stage_header, _stage_rows(report), markdown=True),
        "",
        "CPU per answer, ms, by process, every step; " + _cpu_targets_line() + ":",
        "",
        _render(_CPU_HEADER, _cpu_rows(report), markdown=True),
        "",
        *_sched_part(report, markdown=True),
        *_overload_part(
            report,
            "Overload step (late: client-measured service time over the deadline + 2 ms):\n",
            markdown=True,
        ),
        *(f"- {line}" for line in _machine_lines(report)),
        *(f"- {line}" for line in _history_lines(report)),
        *(f"- {line}" for line in _comparison_lines(report)),
        "",
        _goal_part(report, markdown=True),
    ]
    return "\n".join(parts)
