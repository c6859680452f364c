"""``cascade rollout report``: the candidate against the champion on the same traffic (pure).

Input: the rows ``cascade rollout shadow`` wrote (one per decision record scored in shadow, the
champion's answer and the candidate's side by side), and optionally labels (transaction id ->
fraud or not) from any :class:`LabelSource`. Output: agreement of the decisions at the policy
thresholds (a confusion matrix), score correlation and absolute differences, escalation rates,
the candidate's latency and, where labels exist, precision and recall of both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

__all__ = [
    "DECISIONS",
    "JsonlLabelSource",
    "LabelSource",
    "Quality",
    "RolloutReport",
    "build_report",
    "format_report",
    "pearson",
    "quantile",
]

DECISIONS: Final = ("APPROVE", "REVIEW", "DECLINE")


class LabelSource(Protocol):
    """Where outcomes come from: a JSON Lines file (:class:`JsonlLabelSource`); the ``OUTCOMES``
    stream is read by :func:`cascade.quality_job.read_outcome_labels` (``--outcomes``)."""

    def labels(self, transaction_ids: Iterable[str]) -> Mapping[str, bool]:
        """Fraud (True) or genuine (False) for the ids it knows; the others are left out."""
        ...


@dataclass(frozen=True, slots=True)
class JsonlLabelSource:
    """Labels from a JSON Lines file: ``{"transaction_id": "...", "fraud": true}`` per line."""

    path: Path

    def labels(self, transaction_ids: Iterable[str]) -> Mapping[str, bool]:
        """The file's labels for ``transaction_ids``."""
        wanted = set(transaction_ids)
        out: dict[str, bool] = {}
        with self.path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    row = json.loads(line)
                    if row["transaction_id"] in wanted:
                        out[row["transaction_id"]] = bool(row["fraud"])
        return out


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson correlation; None with fewer than two points or a constant side."""
    n = len(xs)
    if n < 2 or n != len(ys):
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def quantile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass(frozen=True, slots=True)
class Quality:
    """Precision and recall of one side against the labels."""

    labelled: int
    frauds: int
    decline_precision: float | None
    decline_recall: float | None
    flag_precision: float | None
    """REVIEW or DECLINE counted as flagged."""
    flag_recall: float | None


def _quality(decisions: Sequence[str], truth: Sequence[bool]) -> Quality:
    def pr(flagged: Sequence[bool]) -> tuple[float | None, float | None]:
        tp = sum(f and t for f, t in zip(flagged, truth, strict=True))
        n_flagged, n_true = sum(flagged), sum(truth)
        return (tp / n_flagged if n_flagged else None, tp / n_true if n_true else None)

    dp, dr = pr([d == "DECLINE" for d in decisions])
    fp, fr = pr([d in ("REVIEW", "DECLINE") for d in decisions])
    return Quality(len(truth), sum(truth), dp, dr, fp, fr)


@dataclass(slots=True)
class RolloutReport:
    """What :func:`build_report` measured."""

    rows: int
    champion_versions: list[str]
    candidate_versions: list[str]
    agreement: float | None
    confusion: dict[str, dict[str, int]]
    """champion decision -> candidate decision -> count."""
    score_correlation: float | None
    stage1_correlation: float | None
    mean_abs_diff: float | None
    p99_abs_diff: float | None
    max_abs_diff: float | None
    champion_escalated: float | None
    candidate_escalated: float | None
    candidate_stage2_missing: int
    candidate_latency_p50_us: float | None
    candidate_latency_p99_us: float | None
    champion_quality: Quality | None = None
    candidate_quality: Quality | None = None
    notes: list[str] = field(default_factory=list)


def build_report(
    rows: Sequence[Mapping[str, object]], labels: Mapping[str, bool] | None = None
) -> RolloutReport:
    """Compare the two sides of every shadow row (``champion_*`` and ``candidate_*`` fields)."""
    confusion = {a: dict.fromkeys(DECISIONS, 0) for a in DECISIONS}
    for row in rows:
        confusion[str(row["champion_decision"])][str(row["candidate_decision"])] += 1
    n = len(rows)
    agree = sum(confusion[d][d] for d in DECISIONS)
    champ = [float(row["champion_score"]) for row in rows]  # type: ignore[arg-type]
    cand = [float(row["candidate_score"]) for row in rows]  # type: ignore[arg-type]
    s1_champ = [float(row["champion_stage1_score"]) for row in rows]  # type: ignore[arg-type]
    s1_cand = [float(row["candidate_stage1_score"]) for row in rows]  # type: ignore[arg-type]
    diffs = [abs(a - b) for a, b in zip(champ, cand, strict=True)]
    latency = [float(row["candidate_latency_us"]) for row in rows]  # type: ignore[arg-type]
    report = RolloutReport(
        rows=n,
        champion_versions=sorted({str(row["champion_versions"]) for row in rows}),
        candidate_versions=sorted({str(row["candidate_versions"]) for row in rows}),
        agreement=agree / n if n else None,
        confusion=confusion,
        score_correlation=pearson(champ, cand),
        stage1_correlation=pearson(s1_champ, s1_cand),
        mean_abs_diff=sum(diffs) / n if n else None,
        p99_abs_diff=quantile(diffs, 0.99),
        max_abs_diff=max(diffs) if diffs else None,
        champion_escalated=sum(bool(r["champion_escalated"]) for r in rows) / n if n else None,
        candidate_escalated=sum(bool(r["candidate_escalated"]) for r in rows) / n if n else None,
        candidate_stage2_missing=sum(bool(r.get("candidate_stage2_missing")) for r in rows),
        candidate_latency_p50_us=quantile(latency, 0.5),
        candidate_latency_p99_us=quantile(latency, 0.99),
    )
    if labels:
        known = [r for r in rows if str(r["transaction_id"]) in labels]
        truth = [labels[str(r["transaction_id"])] for r in known]
        if known:
            report.champion_quality = _quality([str(r["champion_decision"]) for r in known], truth)
            report.candidate_quality = _quality(
                [str(r["candidate_decision"]) for r in known], truth
            )
        else:
            report.notes.append("no shadow row has a label yet")
    if report.candidate_stage2_missing:
        report.notes.append(
            f"{report.candidate_stage2_missing} rows: the candidate escalated where the champion "
            "did not and no stage-2 score was available; its stage-1 score decided them"
        )
    return report


def _f(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def format_report(report: RolloutReport) -> str:
    """The report as text for a terminal."""
    lines = [
        f"shadow rows: {report.rows}",
        f"champion  {', '.join(report.champion_versions) or '-'}",
        f"candidate {', '.join(report.candidate_versions) or '-'}",
        f"decision agreement: {_f(report.agreement, '.2%')}",
        "confusion (rows: champion, columns: candidate)",
        "            " + "".join(f"{d:>10}" for d in DECISIONS),
    ]
    for a in DECISIONS:
        lines.append(f"  {a:<10}" + "".join(f"{report.confusion[a][b]:>10}" for b in DECISIONS))
    lines += [
        f"final score correlation {_f(report.score_correlation)}   "
        f"stage-1 {_f(report.stage1_correlation)}",
        f"abs score diff mean {_f(report.mean_abs_diff)}  p99 {_f(report.p99_abs_diff)}  "
        f"max {_f(report.max_abs_diff)}",
        f"escalated: champion {_f(report.champion_escalated, '.2%')}  "
        f"candidate {_f(report.candidate_escalated, '.2%')}",
        f"candidate latency (shadow, per record) p50 {_f(report.candidate_latency_p50_us, '.0f')}"
        f" us  p99 {_f(report.candidate_latency_p99_us, '.0f')} us",
    ]
    for name, q in (("champion", report.champion_quality), ("candidate", report.candidate_quality)):
        if q is not None:
            lines.append(
                f"{name}: {q.labelled} labelled, {q.frauds} fraud; DECLINE precision "
                f"{_f(q.decline_precision)} recall {_f(q.decline_recall)}; REVIEW+DECLINE "
                f"precision {_f(q.flag_precision)} recall {_f(q.flag_recall)}"
            )
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)
