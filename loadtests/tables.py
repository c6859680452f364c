"""Plain-text and Markdown tables of a report (pure), for the terminal and ``docs/latency.md``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from loadtests.report import common_rate

__all__ = ["markdown_tables", "text_table"]

_STAGES = ("redis", "features", "stage1", "stage2", "orchestrator", "transport", "server_total")


def _steps(report: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    rows: list[tuple[str, Mapping[str, Any]]] = []
    for name, target in report["targets"].items():
        if target.get("serial"):
            rows.append((name, target["serial"]))
        rows += [(name, s) for s in sorted(target["steps"], key=lambda s: s["offered_rate"])]
    return rows


def _step_cells(name: str, step: Mapping[str, Any]) -> list[str]:
    lat, rates = step["latency_ms"], step["rates"]
    offered = "1 in flight" if step["mode"] == "serial" else f"{step['offered_rate']:g}"
    return [
        name,
        offered,
        f"{step['achieved_rate']:.0f}",
        *(f"{lat[k]:.2f}" for k in ("p50", "p95", "p99", "p99_9", "max")),
        f"{step['send_lag_ms']['p99']:.2f}",
        f"{rates['slo_attainment']:.2%}",
        f"{rates['error'] + rates['timeout']:.2%}",
        f"{rates['fallback']:.2%}",
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
    "escalated",
    "cache hits",
    "at SLO",
]


def _stage_rows(report: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for name, label, step in _picked_steps(report):
        cells = [name, label]
        for stage in _STAGES:
            summary = step["stages_ms"][stage]
            cells.append(
                f"{summary['p50']:.3f} / {summary['p99']:.3f}" if summary["count"] else "-"
            )
        rows.append(cells)
    return rows


_CPU_ROLES = (
    "orchestrator",
    "screening-workers",
    "naive-server",
    "naive-workers",
    "redis",
    "nats",
    "triton",
    "loadgen",
    "total",
)


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


def _cpu_rows(report: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for name, label, step in _picked_steps(report):
        cpu = step.get("cpu")
        if not cpu:
            continue
        cells = [name, label]
        for role in _CPU_ROLES:
            if role in cpu["cores"] and (role == "total" or cpu["cores"][role] > 0.005):
                cells.append(f"{cpu['ms_per_answer'][role]:.3f} ({cpu['cores'][role]:.2f})")
            else:
                cells.append("-")
        rows.append(cells)
    return rows


def _render(header: list[str], rows: list[list[str]], *, markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), *(fmt.format(*r) for r in rows)])


def _comparison_lines(report: Mapping[str, Any]) -> list[str]:
    comp = report.get("comparison") or {"capacity_rate": None}
    cap = comp["capacity_rate"]
    lines = (
        []
        if cap is None
        else [
            f"capacity at SLO: cascade {cap['cascade']}/s, naive {cap['naive']}/s, "
            f"ratio {cap['ratio']}x"
        ]
    )
    for key, row in comp.get("capacity_by_p99_ms", {}).items():
        lines.append(
            f"capacity at p99 <= {key} ms (and every answer in budget): cascade "
            f"{row['cascade']}/s, naive {row['naive']}/s, ratio {row['ratio']}x"
        )
    for name, target in report["targets"].items():
        floor = (target.get("serial") or {}).get("grpc_floor_ms")
        if floor:
            lines.append(
                f"gRPC floor ({name}, health Check, 1 in flight): p50 {floor['p50']:.2f} ms, "
                f"p99 {floor['p99']:.2f} ms"
            )
    serial = comp.get("serial_latency")
    if serial:
        lines.append(
            "1 in flight: "
            + ", ".join(
                f"{k} cascade {v['cascade_ms']:.2f} ms vs naive {v['naive_ms']:.2f} ms "
                f"({v['ratio']}x)"
                for k, v in serial.items()
            )
        )
    for row in comp.get("same_rate", []):
        lines.append(
            f"@{row['rate']:g}/s: p50 {row['p50']['cascade_ms']:.2f} vs {row['p50']['naive_ms']:.2f} "
            f"ms ({row['p50']['ratio']}x), p99 {row['p99']['cascade_ms']:.2f} vs "
            f"{row['p99']['naive_ms']:.2f} ms ({row['p99']['ratio']}x)"
        )
    return lines


def _goal_rows(report: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for goal in report.get("goals", []):
        measured = goal["measured"]
        rows.append(
            [
                goal["goal"],
                "-" if measured is None else f"{measured:g}",
                {True: "met", False: "NOT met", None: "not measured"}[goal["met"]],
            ]
        )
    return rows


def text_table(report: Mapping[str, Any]) -> str:
    """The whole report as terminal text: steps, stages, comparison, goals."""
    stage_header = ["target", "step", *(f"{s} p50/p99" for s in _STAGES)]
    parts = [
        _render(_STEP_HEADER, [_step_cells(n, s) for n, s in _steps(report)], markdown=False),
        "",
        "per stage, ms (p50 / p99):",
        _render(stage_header, _stage_rows(report), markdown=False),
        "",
        "CPU per answer, ms (cores busy):",
        _render(["target", "step", *_CPU_ROLES], _cpu_rows(report), markdown=False),
        "",
        *_comparison_lines(report),
        "",
        _render(["goal", "measured", ""], _goal_rows(report), markdown=False),
    ]
    return "\n".join(parts)


def markdown_tables(report: Mapping[str, Any]) -> str:
    """The same tables in Markdown, for ``docs/latency.md``."""
    stage_header = ["target", "step", *(f"{s} p50 / p99" for s in _STAGES)]
    parts = [
        _render(_STEP_HEADER, [_step_cells(n, s) for n, s in _steps(report)], markdown=True),
        "",
        "Per stage, ms (p50 / p99):",
        "",
        _render(stage_header, _stage_rows(report), markdown=True),
        "",
        "CPU per answer, ms (cores busy), by process:",
        "",
        _render(["target", "step", *_CPU_ROLES], _cpu_rows(report), markdown=True),
        "",
        *(f"- {line}" for line in _comparison_lines(report)),
        "",
        _render(["goal", "measured", ""], _goal_rows(report), markdown=True),
    ]
    return "\n".join(parts)
