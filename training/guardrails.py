"""Decision-level guardrails for a reduced-precision stage-2 variant against its original.

PR-AUC alone is a poor guard: on this traffic it is dominated by the easiest pattern (card
testing), and it says nothing about the answers the policy actually gives. A variant is held to
what callers see instead, on the same weighted evaluation sample as the original:

* **Decision flips at the policy's thresholds**: route every sampled transaction as the
  cascade does (its stage-1 score, or in the escalation band its stage-2 score, decided against
  the policy's thresholds) with the original's and with the variant's stage-2 scores; the
  weighted share of *escalated* transactions whose APPROVE/REVIEW/DECLINE differs is bounded
  by ``max_flip_rate``. (Only escalated transactions can flip; their share of all traffic is
  reported beside it.)
* **Recall per fraud pattern**: for each pattern, the share of its fraud answered REVIEW or
  DECLINE, and the share DECLINEd, may drop by at most ``recall_margin`` from the original's.
* **Largest score difference**: bounded by ``max_abs_score_diff``, so a variant cannot pass by
  being wrong only where the sample is thin.

Pure functions over arrays: the I/O (building, scoring, writing the manifest) is in
:mod:`training.quantize`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np

from cascade.decision import Decision

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from cascade.model_registry import Policy

__all__ = [
    "DECISION_CODES",
    "DEFAULT_BOUNDS",
    "GuardrailBounds",
    "GuardrailResult",
    "PatternRecall",
    "cascade_decisions",
    "check_variant",
]

_APPROVE: Final = 0
_REVIEW: Final = 1
_DECLINE: Final = 2
DECISION_CODES: Final = {
    Decision.APPROVE: _APPROVE,
    Decision.REVIEW: _REVIEW,
    Decision.DECLINE: _DECLINE,
}


@dataclass(frozen=True, slots=True)
class GuardrailBounds:
    """How far a variant may move from its original and still be servable."""

    pr_auc_margin: float = 0.01
    max_flip_rate: float = 0.005  # of escalated transactions, weighted
    recall_margin: float = 0.01  # per fraud pattern, REVIEW-or-DECLINE and DECLINE alike
    max_abs_score_diff: float = 0.02


DEFAULT_BOUNDS: Final = GuardrailBounds()


@dataclass(frozen=True, slots=True)
class PatternRecall:
    """One fraud pattern's recall at the policy's thresholds, original against variant."""

    pattern: str
    frauds: int
    caught: float  # REVIEW or DECLINE, variant
    baseline_caught: float
    declined: float
    baseline_declined: float


@dataclass(frozen=True, slots=True)
class GuardrailResult:
    """Every guardrail measured, and which ones failed (empty: the variant is servable)."""

    pr_auc: float
    baseline_pr_auc: float
    flip_rate_escalated: float
    flip_rate_all: float
    escalated_share: float
    max_abs_score_diff: float
    patterns: tuple[PatternRecall, ...]
    failures: tuple[str, ...]

    @property
    def servable(self) -> bool:
        """All guardrails hold."""
        return not self.failures


def cascade_decisions(
    policy: Policy, stage1: NDArray[np.float32], stage2: NDArray[np.float32]
) -> NDArray[np.int8]:
    """Decision codes (0 APPROVE, 1 REVIEW, 2 DECLINE) the cascade gives each row, routing by
    the policy's escalation band and deciding by its thresholds (the request path's rules)."""
    escalated = (stage1 >= policy.escalate_low) & (stage1 < policy.escalate_high)
    final = np.where(escalated, stage2, stage1)
    codes = np.full(final.shape, _APPROVE, dtype=np.int8)
    codes[final >= policy.review_threshold] = _REVIEW
    codes[final >= policy.decline_threshold] = _DECLINE
    return codes


def _weighted_share(mask: NDArray[np.bool_], weights: NDArray[np.float64]) -> float:
    total = float(weights.sum())
    return float(weights[mask].sum()) / total if total > 0 else 0.0


def check_variant(
    policy: Policy,
    *,
    stage1: NDArray[np.float32],
    baseline: NDArray[np.float32],
    variant: NDArray[np.float32],
    labels: NDArray[np.int8],
    patterns: NDArray[np.str_],
    weights: NDArray[np.float64],
    pr_auc: float,
    baseline_pr_auc: float,
    bounds: GuardrailBounds = DEFAULT_BOUNDS,
) -> GuardrailResult:
    """Measure ``variant``'s stage-2 scores against ``baseline``'s on one weighted sample."""
    if not (len(stage1) == len(baseline) == len(variant) == len(labels) == len(weights)):
        raise ValueError("every array must have one entry per sampled transaction")
    base_codes = cascade_decisions(policy, stage1, baseline)
    var_codes = cascade_decisions(policy, stage1, variant)
    escalated = (stage1 >= policy.escalate_low) & (stage1 < policy.escalate_high)
    flipped = base_codes != var_codes
    flip_escalated = (
        _weighted_share(flipped[escalated], weights[escalated]) if escalated.any() else 0.0
    )
    failures: list[str] = []
    if baseline_pr_auc - pr_auc > bounds.pr_auc_margin:
        failures.append(
            f"PR-AUC {pr_auc:.4f} is more than {bounds.pr_auc_margin} below {baseline_pr_auc:.4f}"
        )
    if flip_escalated > bounds.max_flip_rate:
        failures.append(
            f"{flip_escalated:.3%} of escalated decisions flip (bound {bounds.max_flip_rate:.3%})"
        )
    max_diff = float(np.abs(variant - baseline).max()) if len(variant) else 0.0
    if max_diff > bounds.max_abs_score_diff:
        failures.append(
            f"largest score difference {max_diff:.4f} exceeds {bounds.max_abs_score_diff}"
        )
    recalls = []
    for pattern in sorted({str(p) for p in patterns[labels == 1]}):
        rows = (labels == 1) & (patterns == pattern)
        w = weights[rows]
        recall = PatternRecall(
            pattern=pattern or "(none)",
            frauds=int(rows.sum()),
            caught=_weighted_share(var_codes[rows] >= _REVIEW, w),
            baseline_caught=_weighted_share(base_codes[rows] >= _REVIEW, w),
            declined=_weighted_share(var_codes[rows] == _DECLINE, w),
            baseline_declined=_weighted_share(base_codes[rows] == _DECLINE, w),
        )
        recalls.append(recall)
        for what, got, want in (
            ("REVIEW-or-DECLINE", recall.caught, recall.baseline_caught),
            ("DECLINE", recall.declined, recall.baseline_declined),
        ):
            if want - got > bounds.recall_margin:
                failures.append(
                    f"{recall.pattern}: {what} recall {got:.3f} is more than "
                    f"{bounds.recall_margin} below {want:.3f}"
                )
    return GuardrailResult(
        pr_auc=pr_auc,
        baseline_pr_auc=baseline_pr_auc,
        flip_rate_escalated=flip_escalated,
        flip_rate_all=_weighted_share(flipped, weights),
        escalated_share=_weighted_share(escalated, weights),
        max_abs_score_diff=max_diff,
        patterns=tuple(recalls),
        failures=tuple(failures),
    )
