"""Live model quality: decisions joined with outcomes (by transaction id), measured per model
and policy version over sliding windows of decision time. Pure computation, no I/O: the reading
of the streams and the metrics are :mod:`cascade.quality_job`'s.

Per window (decided in ``(now - window, now]``) and per ``(policy, stage1, stage2)`` versions:

* precision and recall at the policy's thresholds, from the decision the policy gave: DECLINE
  (flagged = DECLINE) and REVIEW (flagged = REVIEW or DECLINE, i.e. score >= the review
  threshold);
* PR-AUC (average precision) of the stage-1 scores, and of the stage-2 scores of the
  transactions stage 2 scored;
* the label delay distribution (first label's ``reported_at`` minus the transaction's
  timestamp), the share of decisions labelled, and PSI drift (:mod:`cascade.drift`).

Label semantics: a transaction with a CONFIRMED_FRAUD or CHARGEBACK label is fraud, whatever
else it has (a fraud label after a "genuine" clearance wins); one with only GENUINE labels is
genuine; an unlabelled one is presumed genuine (``unlabelled="genuine"``, the default: genuine
transactions are seldom labelled explicitly) or left out (``"exclude"``). With the default,
precision in recent windows is biased low until the labels arrive (chargebacks take weeks):
read it with ``labelled_share`` and the label delay.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from cascade.drift import DriftReference, psi
from cascade.outcome_record import FRAUD_LABELS
from cascade.v1 import decisions_pb2, scoring_pb2

__all__ = [
    "DecisionPoint",
    "DriftQuality",
    "QualityJoiner",
    "QualityReport",
    "ThresholdQuality",
    "VersionKey",
    "VersionQuality",
    "WindowReport",
    "average_precision",
    "decision_point",
    "format_window",
    "parse_window",
    "precision_recall",
    "report_json",
    "report_table",
]

Unlabelled = Literal["genuine", "exclude"]

_DECLINE: Final = scoring_pb2.DECISION_DECLINE
_REVIEW: Final = scoring_pb2.DECISION_REVIEW
_DEFAULT: Final = scoring_pb2.DECIDED_BY_DEFAULT
_UNIT_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DELAY_QUANTILES: Final = (0.5, 0.9, 0.99)


def parse_window(text: str) -> int:
    """``90s``, ``15m``, ``1h``, ``7d`` -> seconds; ValueError otherwise."""
    text = text.strip()
    unit = text[-1:]
    if unit not in _UNIT_S or not text[:-1].isdigit() or int(text[:-1]) <= 0:
        raise ValueError(f"{text!r} is not a window like 1h, 24h or 7d")
    return int(text[:-1]) * _UNIT_S[unit]


def format_window(window_s: int) -> str:
    """The shortest ``N<unit>`` for ``window_s`` (the label on metrics and tables)."""
    for unit in ("d", "h", "m"):
        if window_s % _UNIT_S[unit] == 0:
            return f"{window_s // _UNIT_S[unit]}{unit}"
    return f"{window_s}s"


@dataclass(frozen=True, slots=True, order=True)
class VersionKey:
    """The versions an answer was given with: what quality is reported per."""

    policy: str
    stage1: str
    stage2: str


@dataclass(frozen=True, slots=True)
class DecisionPoint:
    """What the joiner keeps of one decision record."""

    transaction_id: str
    decided_at_ms: int
    timestamp_ms: int
    versions: VersionKey
    decision: int
    stage1_score: float | None
    stage2_score: float | None
    features: tuple[float, ...] | None
    """The monitored features only (the drift reference's columns), when stage 1 read any."""


def decision_point(
    record: decisions_pb2.DecisionRecord, feature_columns: tuple[int, ...] = ()
) -> DecisionPoint:
    """The joiner's view of a record; ``feature_columns`` picks the drift features."""
    tx, answer = record.transaction, record.answer
    v = answer.versions
    features = None
    if feature_columns and len(record.features) > max(feature_columns):
        row = record.features
        features = tuple(float(row[i]) for i in feature_columns)
    return DecisionPoint(
        transaction_id=tx.transaction_id,
        decided_at_ms=record.decided_at_ms,
        timestamp_ms=tx.timestamp_ms,
        versions=VersionKey(v.policy, v.stage1, v.stage2),
        decision=answer.decision,
        stage1_score=None if answer.decided_by == _DEFAULT else float(answer.stage1_score),
        stage2_score=float(record.stage2_score) if record.HasField("stage2_score") else None,
        features=features,
    )


@dataclass(frozen=True, slots=True)
class ThresholdQuality:
    """Precision and recall of the transactions flagged at one threshold (NaN: undefined)."""

    precision: float
    recall: float
    true_positives: int
    false_positives: int
    false_negatives: int


def precision_recall(
    flagged: npt.NDArray[np.bool_], fraud: npt.NDArray[np.bool_]
) -> ThresholdQuality:
    """Precision = TP / flagged (NaN when nothing is flagged), recall = TP / fraud (NaN when
    there is no fraud)."""
    tp = int(np.sum(flagged & fraud))
    fp = int(np.sum(flagged & ~fraud))
    fn = int(np.sum(~flagged & fraud))
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    return ThresholdQuality(precision, recall, tp, fp, fn)


def average_precision(scores: npt.NDArray[np.floating[Any]], fraud: npt.NDArray[np.bool_]) -> float:
    """PR-AUC as average precision (sklearn's step definition: tied scores are one threshold);
    NaN without any fraud."""
    if scores.size == 0 or not fraud.any():
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    y = fraud[order].astype(np.float64)
    tp = np.cumsum(y)
    fp = np.cumsum(1.0 - y)
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    tp, fp = tp[last_of_tie], fp[last_of_tie]
    precision = tp / (tp + fp)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


@dataclass(frozen=True, slots=True)
class DriftQuality:
    """PSI of the stage-1 score and of each monitored feature (NaN: nothing to compare)."""

    score_psi: float
    feature_psi: dict[str, float]


@dataclass(frozen=True, slots=True)
class VersionQuality:
    """One version triple's quality in one window."""

    versions: VersionKey
    decisions: int
    labelled: int
    labelled_share: float
    fraud: int
    """Transactions with a fraud label."""
    genuine_labelled: int
    decline: ThresholdQuality
    review: ThresholdQuality
    stage1_pr_auc: float
    stage2_pr_auc: float
    stage2_scored: int
    label_delay_s: dict[str, float]
    """count, p50, p90, p99, max of (first label's reported_at - transaction time), seconds."""
    drift: DriftQuality | None


@dataclass(frozen=True, slots=True)
class WindowReport:
    """Every version seen in one window."""

    window: str
    window_s: int
    versions: list[VersionQuality]


@dataclass(frozen=True, slots=True)
class QualityReport:
    """The joiner's state measured at ``now_ms``."""

    now_ms: int
    unlabelled: str
    decisions_held: int
    outcomes_held: int
    windows: list[WindowReport] = field(default_factory=list)


@dataclass(slots=True)
class _Labels:
    fraud_at_ms: int | None = None
    genuine_at_ms: int | None = None

    def add(self, label: int, reported_at_ms: int) -> None:
        if label in FRAUD_LABELS:
            if self.fraud_at_ms is None or reported_at_ms < self.fraud_at_ms:
                self.fraud_at_ms = reported_at_ms
        elif self.genuine_at_ms is None or reported_at_ms < self.genuine_at_ms:
            self.genuine_at_ms = reported_at_ms

    @property
    def is_fraud(self) -> bool:
        return self.fraud_at_ms is not None

    @property
    def first_at_ms(self) -> int:
        # The label that decided: the first fraud label, else the first genuine one.
        if self.fraud_at_ms is not None:
            return self.fraud_at_ms
        assert self.genuine_at_ms is not None
        return self.genuine_at_ms


def _quantiles(delays_s: npt.NDArray[np.float64]) -> dict[str, float]:
    if delays_s.size == 0:
        return {"count": 0.0}
    out = {"count": float(delays_s.size)}
    for q in _DELAY_QUANTILES:
        out[f"p{round(q * 100)}"] = float(np.quantile(delays_s, q))
    out["max"] = float(delays_s.max())
    return out


class QualityJoiner:
    """Decisions and outcomes in memory, joined by transaction id when measured.

    The first decision of a transaction id is kept (the decision log's rule: the lowest stream
    sequence wins); outcomes may arrive before or after their decision. ``references`` maps a
    stage-1 version to its drift reference, whose feature columns the points must carry.
    """

    def __init__(
        self,
        *,
        references: dict[str, DriftReference] | None = None,
        unlabelled: Unlabelled = "genuine",
    ) -> None:
        self._decisions: dict[str, DecisionPoint] = {}
        self._labels: dict[str, _Labels] = {}
        self._references = references or {}
        self._unlabelled = unlabelled

    @property
    def references(self) -> dict[str, DriftReference]:
        """The drift references by stage-1 version."""
        return self._references

    def add_decision(self, point: DecisionPoint) -> None:
        """Keep ``point`` unless its transaction already has a decision."""
        self._decisions.setdefault(point.transaction_id, point)

    def add_outcome(self, transaction_id: str, label: int, reported_at_ms: int) -> None:
        """Record a label (any number per transaction; see the module doc for how they
        combine)."""
        self._labels.setdefault(transaction_id, _Labels()).add(label, reported_at_ms)

    def evict_before(self, decided_before_ms: int) -> int:
        """Forget decisions (and their labels) decided before ``decided_before_ms``: they left
        every window. Returns how many."""
        old = [k for k, p in self._decisions.items() if p.decided_at_ms < decided_before_ms]
        for k in old:
            del self._decisions[k]
            self._labels.pop(k, None)
        return len(old)

    def report(self, now_ms: int, windows_s: list[int]) -> QualityReport:
        """Quality per window and version at ``now_ms``."""
        report = QualityReport(
            now_ms=now_ms,
            unlabelled=self._unlabelled,
            decisions_held=len(self._decisions),
            outcomes_held=len(self._labels),
        )
        points = list(self._decisions.values())
        for window_s in windows_s:
            start_ms = now_ms - window_s * 1000
            groups: dict[VersionKey, list[DecisionPoint]] = {}
            for p in points:
                if start_ms < p.decided_at_ms <= now_ms:
                    groups.setdefault(p.versions, []).append(p)
            report.windows.append(
                WindowReport(
                    window=format_window(window_s),
                    window_s=window_s,
                    versions=[self._measure(k, groups[k]) for k in sorted(groups)],
                )
            )
        return report

    def _measure(self, key: VersionKey, points: list[DecisionPoint]) -> VersionQuality:
        labels = [self._labels.get(p.transaction_id) for p in points]
        labelled = np.array([lab is not None for lab in labels], dtype=np.bool_)
        fraud = np.array([lab is not None and lab.is_fraud for lab in labels], dtype=np.bool_)
        decision = np.array([p.decision for p in points], dtype=np.int64)
        s1 = np.array(
            [np.nan if p.stage1_score is None else p.stage1_score for p in points],
            dtype=np.float64,
        )
        s2 = np.array(
            [np.nan if p.stage2_score is None else p.stage2_score for p in points],
            dtype=np.float64,
        )
        delays_s = np.array(
            [
                (lab.first_at_ms - p.timestamp_ms) / 1000.0
                for p, lab in zip(points, labels, strict=True)
                if lab is not None
            ],
            dtype=np.float64,
        )
        # Who counts: every decision (unlabelled presumed genuine), or the labelled ones only.
        counted = labelled if self._unlabelled == "exclude" else np.ones_like(labelled)
        declined = decision == _DECLINE
        reviewed = declined | (decision == _REVIEW)
        has_s1 = counted & ~np.isnan(s1)
        has_s2 = counted & ~np.isnan(s2)
        return VersionQuality(
            versions=key,
            decisions=len(points),
            labelled=int(labelled.sum()),
            labelled_share=float(labelled.mean()) if points else float("nan"),
            fraud=int(fraud.sum()),
            genuine_labelled=int((labelled & ~fraud).sum()),
            decline=precision_recall(declined[counted], fraud[counted]),
            review=precision_recall(reviewed[counted], fraud[counted]),
            stage1_pr_auc=average_precision(s1[has_s1], fraud[has_s1]),
            stage2_pr_auc=average_precision(s2[has_s2], fraud[has_s2]),
            stage2_scored=int((~np.isnan(s2)).sum()),
            label_delay_s=_quantiles(delays_s),
            drift=self._drift(key.stage1, points, s1),
        )

    def _drift(
        self, stage1: str, points: list[DecisionPoint], s1: npt.NDArray[np.float64]
    ) -> DriftQuality | None:
        reference = self._references.get(stage1)
        if reference is None:
            return None
        rows = [p.features for p in points if p.features is not None]
        matrix = np.array(rows, dtype=np.float64).reshape(len(rows), len(reference.features))
        return DriftQuality(
            score_psi=psi(reference.score, s1[~np.isnan(s1)]),
            feature_psi={
                f.name: psi(f.bins, matrix[:, k]) for k, f in enumerate(reference.features)
            },
        )


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def report_json(report: QualityReport) -> dict[str, Any]:
    """The report as JSON-ready data (NaN -> null)."""
    return dict(_finite(asdict(report)))


def _f(value: float, digits: int = 4) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def _days(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 86400:.1f}d"


def report_table(report: QualityReport) -> list[str]:
    """A table per window and version, for the terminal."""
    lines = [
        f"quality at {report.now_ms} ms: {report.decisions_held} decisions and "
        f"{report.outcomes_held} labelled transactions held; unlabelled counted as "
        f"{report.unlabelled}"
    ]
    for window in report.windows:
        lines.append("")
        lines.append(f"window {window.window}")
        if not window.versions:
            lines.append("  (no decisions)")
        for q in window.versions:
            v = q.versions
            d = q.label_delay_s
            lines += [
                f"  {v.policy} / {v.stage1} / {v.stage2}: {q.decisions} decisions, "
                f"{q.labelled} labelled ({_f(q.labelled_share * 100, 1)}%), {q.fraud} fraud, "
                f"{q.genuine_labelled} labelled genuine",
                f"    DECLINE precision {_f(q.decline.precision)} recall {_f(q.decline.recall)}"
                f"   (tp {q.decline.true_positives} fp {q.decline.false_positives} "
                f"fn {q.decline.false_negatives})",
                f"    REVIEW  precision {_f(q.review.precision)} recall {_f(q.review.recall)}"
                f"   (tp {q.review.true_positives} fp {q.review.false_positives} "
                f"fn {q.review.false_negatives})",
                f"    PR-AUC stage 1 {_f(q.stage1_pr_auc)}  stage 2 {_f(q.stage2_pr_auc)} "
                f"({q.stage2_scored} scored by stage 2)",
                f"    label delay p50 {_days(d.get('p50'))} p90 {_days(d.get('p90'))} "
                f"p99 {_days(d.get('p99'))} max {_days(d.get('max'))}",
            ]
            if q.drift is not None:
                worst = sorted(q.drift.feature_psi.items(), key=lambda kv: -(kv[1] or 0.0))
                features = ", ".join(f"{name} {_f(value, 3)}" for name, value in worst)
                lines.append(f"    PSI stage-1 score {_f(q.drift.score_psi, 3)}; {features}")
    return lines
