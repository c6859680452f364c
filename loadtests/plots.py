"""The report's pictures (PNG, matplotlib's Agg backend; matplotlib is imported lazily).

* :func:`plot_summary` one row per target: latency percentiles at the serial step and at the
  reference step (the highest rate every target ran unsaturated, so the rows compare), the per-stage decomposition (p50 and p99), and the step's rates.
* :func:`plot_sweep` latency percentiles against offered load for every target, with the p99
  target, the budget and each target's capacity marked, and achieved against offered rate.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from loadtests.report import FLOOR_NAME, common_rate

__all__ = ["plot_summary", "plot_sweep", "reference_step"]

_STAGE_ORDER: Final = ("redis", "features", "stage1", "stage2", "orchestrator", "transport")
_STAGE_COLOURS: Final = ("#d62728", "#9467bd", "#1f77b4", "#ff7f0e", "#7f7f7f", "#2ca02c")
_TARGET_STYLE: Final = {"cascade": "-", "naive": "--", FLOOR_NAME: "-."}
_STYLE_WORDS: Final = {"-": "solid", "--": "dashed", "-.": "dash-dot", ":": "dotted"}
_PERCENTILE_KEYS: Final = (("p50", "p50"), ("p99", "p99"), ("p99_9", "p99.9"), ("max", "max"))


def reference_step(
    target: Mapping[str, Any], rate: float | None = None
) -> Mapping[str, Any] | None:
    """The open-loop step a summary is about: the one at ``rate`` if given and run, else the
    capacity step, else the last one."""
    steps: list[Mapping[str, Any]] = [s for s in target.get("steps", []) if s["mode"] == "open"]
    if not steps:
        return None
    for step in steps:
        if rate is not None and step["offered_rate"] == rate:
            return step
    cap = target.get("capacity")
    if cap:
        for step in steps:
            if step["label"] == cap["label"]:
                return step
    return steps[-1]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_ticks(ax: Any) -> None:
    """Log axis labelled 1, 2, 5, 10, ... ms rather than in powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _stage_bars(ax: Any, steps: list[tuple[str, Mapping[str, Any]]], stat: str) -> None:
    """Horizontal stacked bars: where one request's time goes, by stage, at ``stat``."""
    for row, (_, step) in enumerate(steps):
        left = 0.0
        for stage, colour in zip(_STAGE_ORDER, _STAGE_COLOURS, strict=True):
            summary = step["stages_ms"][stage]
            # A stage that ran for only some answers (stage 2) is scaled by its share.
            share = summary["count"] / max(step["counts"]["ok"], 1)
            width = summary[stat] * share
            ax.barh(row, width, left=left, color=colour, label=stage if row == 0 else None)
            left += width
        ax.text(left, row, f" {left:.2f} ms", va="center", fontsize=8)
    ax.set_yticks(range(len(steps)), [name for name, _ in steps], fontsize=8)
    ax.set_xlabel(f"ms per request ({stat}, stage 2 weighted by how often it ran)")
    ax.legend(fontsize=7, ncol=3, loc="lower right")


def plot_summary(report: Mapping[str, Any], path: Path) -> Path:
    """Write the per-target summary figure to ``path``."""
    plt = _pyplot()
    targets = report["targets"]
    rate = common_rate(report)
    fig, axes = plt.subplots(len(targets), 3, figsize=(17, 4.2 * len(targets)), squeeze=False)
    for row, (name, target) in enumerate(targets.items()):
        ref = reference_step(target, rate)
        serial = target.get("serial")
        ax_lat, ax_stage, ax_text = axes[row]
        labelled = [(f"{name} 1 in flight", serial)] if serial else []
        if ref is not None:
            labelled.append((f"{name} @{ref['offered_rate']:g}/s", ref))
        width = 0.8 / max(len(labelled), 1)
        for i, (label, step) in enumerate(labelled):
            values = [step["latency_ms"][key] for key, _ in _PERCENTILE_KEYS]
            xs = [j + i * width for j in range(len(values))]
            ax_lat.bar(xs, values, width=width, label=label)
            for x, v in zip(xs, values, strict=True):
                ax_lat.text(x, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
        ax_lat.set_xticks(
            [j + width * (len(labelled) - 1) / 2 for j in range(len(_PERCENTILE_KEYS))],
            [label for _, label in _PERCENTILE_KEYS],
        )
        ax_lat.set_yscale("log")
        _plain_ticks(ax_lat)
        ax_lat.set_ylabel("latency from intended send, ms")
        ax_lat.set_title(f"{name}: latency percentiles")
        ax_lat.legend(fontsize=8)
        _stage_bars(ax_stage, [(label.split(" ", 1)[1], s) for label, s in labelled], "p50")
        ax_stage.set_title(f"{name}: where the time goes (p50 per stage)")
        ax_text.axis("off")
        if ref is not None:
            r, c = ref["rates"], ref["counts"]
            lines = [
                f"{name} @ {ref['offered_rate']:g}/s offered, {ref['achieved_rate']:.0f}/s achieved",
                f"SLO attainment (<= budget): {r['slo_attainment']:.2%}",
                f"errors {r['error']:.2%}   timeouts {r['timeout']:.2%}",
                f"fallback (degraded) {r['fallback']:.2%}",
                f"escalated {r['escalation']:.2%}   cache hits {r['cache_hit']:.2%}",
                f"sent {c['sent']} = ok {c['ok']} + errors {c['errors']} + timeouts {c['timeouts']}",
                "p99 per stage, ms:",
                *(f"  {s:<13}{ref['stages_ms'][s]['p99']:8.2f}" for s in _STAGE_ORDER),
            ]
            cpu = ref.get("cpu")
            if cpu:
                lines.append("CPU ms per answer (cores):")
                lines += [
                    f"  {role:<18}{cpu['ms_per_answer'][role]:7.3f} ({cores:.2f})"
                    for role, cores in sorted(cpu["cores"].items(), key=lambda kv: -kv[1])
                    if cores > 0.005
                ]
            cap = target.get("capacity")
            lines.append(
                f"capacity at SLO: {cap['rate']:g}/s" if cap else "capacity at SLO: not found"
            )
            ax_text.text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(report: Mapping[str, Any], path: Path) -> Path:
    """Write latency-against-load (and achieved-against-offered) for every target to ``path``."""
    plt = _pyplot()
    meta = report["meta"]
    fig, (ax_lat, ax_rate) = plt.subplots(
        1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [2, 1]}
    )
    colours = {"p50": "#1f77b4", "p99": "#d62728", "p99_9": "#9467bd", "max": "#7f7f7f"}
    top_rate = 0.0
    for name, target in report["targets"].items():
        steps = sorted(
            (s for s in target.get("steps", []) if s["mode"] == "open"),
            key=lambda s: s["offered_rate"],
        )
        if not steps:
            continue
        rates = [s["offered_rate"] for s in steps]
        top_rate = max(top_rate, *rates)
        style = _TARGET_STYLE.get(name, ":")
        for key, label in _PERCENTILE_KEYS:
            ax_lat.plot(
                rates,
                [max(s["latency_ms"][key], 1e-3) for s in steps],
                style,
                marker="o",
                markersize=3,
                color=colours[key],
                label=f"{name} {label}",
            )
        cap = target.get("capacity")
        if cap:
            ax_lat.axvline(cap["rate"], linestyle=style, color="black", alpha=0.4)
            ax_lat.annotate(
                f"{name} capacity {cap['rate']:g}/s",
                (cap["rate"], meta["budget_ms"] * 1.3),
                rotation=90,
                fontsize=7,
                va="bottom",
            )
        ax_rate.plot(rates, [s["achieved_rate"] for s in steps], style, marker="o", label=name)
    ax_lat.axhline(meta["p99_target_ms"], color="#d62728", alpha=0.3, label="p99 target")
    ax_lat.axhline(meta["budget_ms"], color="black", alpha=0.3, label="budget")
    ax_lat.set_yscale("log")
    _plain_ticks(ax_lat)
    ax_lat.set_xlabel("offered rate, requests/s")
    ax_lat.set_ylabel("latency from intended send, ms")
    legend = ", ".join(
        f"{_STYLE_WORDS[_TARGET_STYLE.get(name, ':')]}: {name}" for name in report["targets"]
    )
    ax_lat.set_title(f"latency against offered load ({legend})")
    ax_lat.legend(fontsize=7, ncol=2)
    ax_rate.plot([0, top_rate], [0, top_rate], color="grey", alpha=0.4, label="achieved = offered")
    ax_rate.set_xlabel("offered rate, requests/s")
    ax_rate.set_ylabel("achieved rate (answers/s)")
    ax_rate.set_title("offered vs achieved")
    ax_rate.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
