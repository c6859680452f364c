"""Evaluation sets, cascade scoring, metric tables and policy choice, shared by train/report/calibrate.

This module owns how the models are judged. An :class:`EvalSet` is a window of a simulated stream
with stage-1 scores for every transaction and stage-2 inputs for a *weighted sample*: every fraud
plus genuine transactions drawn from two strata of stage-1 score (the top ``top_share`` and the
rest), each weighted by how many genuine transactions it stands for. Stage 2 is too slow on CPU
to run on a whole window; the weights make false-positive rates those of real traffic, and the
top stratum covers every escalation rate up to ``top_share``.

Everything here needs only numpy and onnxruntime.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np
import onnxruntime as ort

from cascade.model_registry import Policy
from training.datasets import (
    average_precision,
    recall_at_fpr,
    replay_sequences,
    roc_auc,
)
from training.simulator import FraudPattern

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from numpy.typing import NDArray

    from training.datasets import ScreeningData
    from training.simulator import LabelledTransaction

__all__ = [
    "VARIANTS_FILE",
    "EvalSet",
    "build_eval_set",
    "cascade_scores",
    "compare_latency",
    "escalation_cut",
    "metrics_table",
    "pick_policy",
    "stage1_scores",
    "stage2_scores",
    "stratified_negatives",
    "threshold_at_fpr",
    "time_onnx",
]

logger = logging.getLogger(__name__)

# Stage-2 reduced-precision variants and their guardrail results, relative to the model dir.
VARIANTS_FILE: Final = "heavy/variants.json"


@dataclass(slots=True)
class EvalSet:
    """A window of a stream: stage-1 scores for all of it, stage-2 inputs for a weighted sample."""

    stage1_all: NDArray[np.float32]  # every transaction in the window
    labels_all: NDArray[np.int8]
    patterns_all: NDArray[np.str_]
    sample_index: NDArray[np.int64]  # positions in the *_all arrays
    sample_weight: NDArray[np.float64]
    sequences: NDArray[np.float32] | None  # stage-2 inputs of the sample (dropped when not needed)
    stage2: NDArray[np.float32] | None = None  # stage-2 scores of the sample

    @property
    def stage1(self) -> NDArray[np.float32]:
        """Stage-1 scores of the sample."""
        return self.stage1_all[self.sample_index]

    @property
    def labels(self) -> NDArray[np.int8]:
        """Labels of the sample."""
        return self.labels_all[self.sample_index]

    @property
    def patterns(self) -> NDArray[np.str_]:
        """Fraud patterns of the sample ("" for genuine)."""
        return self.patterns_all[self.sample_index]


def time_onnx(path: Path, example: NDArray[np.float32], runs: int = 300) -> dict[str, float]:
    """p50 / p99 latency in ms of one-thread onnxruntime CPU inference on ``example``."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for _ in range(20):
        session.run(None, {name: example})
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, {name: example})
        times.append((time.perf_counter() - started) * 1000.0)
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}


def compare_latency(
    paths: Sequence[Path], example: NDArray[np.float32], *, rounds: int = 7, runs: int = 60
) -> list[float]:
    """Batch latency (ms) of several models on ``example``, robust to a shared machine.

    Rounds interleave the models; each round takes a median per model and the result is the
    best round's median, so a burst of load from another process hits all models alike.
    """
    sessions = [_session(path, 1) for path in paths]
    names = [session.get_inputs()[0].name for session in sessions]
    for session, name in zip(sessions, names, strict=True):
        for _ in range(10):
            session.run(None, {name: example})
    best = [float("inf")] * len(sessions)
    for _ in range(rounds):
        for k, (session, name) in enumerate(zip(sessions, names, strict=True)):
            times = []
            for _ in range(runs):
                started = time.perf_counter()
                session.run(None, {name: example})
                times.append(time.perf_counter() - started)
            best[k] = min(best[k], float(np.median(times)) * 1000.0)
    return best


def _session(path: Path, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def stage1_scores(path: Path, features: NDArray[np.float32]) -> NDArray[np.float32]:
    """Stage-1 ONNX scores of ``features`` as a flat array."""
    session = _session(path, None)
    parts = [
        session.run(["score"], {"features": features[start : start + 65_536]})[0][:, 0]
        for start in range(0, len(features), 65_536)
    ]
    scores: NDArray[np.float32] = np.concatenate(parts).astype(np.float32)
    return scores


def stage2_scores(
    path: Path, sequences: NDArray[np.float32], threads: int | None = None
) -> NDArray[np.float32]:
    """Stage-2 ONNX scores of ``sequences`` as a flat array."""
    session = _session(path, threads)
    parts = [
        session.run(["score"], {"sequence": sequences[start : start + 1024]})[0][:, 0]
        for start in range(0, len(sequences), 1024)
    ]
    scores: NDArray[np.float32] = np.concatenate(parts).astype(np.float32)
    return scores


def stratified_negatives(
    rng: np.random.Generator,
    negatives: NDArray[np.int64],
    scores: NDArray[np.float32],
    top_share: float,
    n_top: int,
    n_rest: int,
) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Sample genuine rows from the top ``top_share`` of ``scores`` and from the rest, weighted.

    ``scores`` is indexed by the values in ``negatives``; the cut is the quantile over all of
    ``scores`` (fraud included), i.e. over the traffic.
    """
    cut = np.quantile(scores, 1.0 - top_share)
    top = negatives[scores[negatives] >= cut]
    rest = negatives[scores[negatives] < cut]
    pick_top = rng.choice(top, size=min(n_top, len(top)), replace=False)
    pick_rest = rng.choice(rest, size=min(n_rest, len(rest)), replace=False)
    weights = np.r_[
        np.full(len(pick_top), len(top) / max(len(pick_top), 1)),
        np.full(len(pick_rest), len(rest) / max(len(pick_rest), 1)),
    ]
    return np.r_[pick_top, pick_rest].astype(np.int64), weights


def build_eval_set(
    records: Sequence[LabelledTransaction],
    data: ScreeningData,
    stage1_all_rows: NDArray[np.float32],
    window: NDArray[np.int64],
    *,
    negatives_per_stratum: int,
    top_share: float = 0.25,
    seed: int = 0,
) -> EvalSet:
    """Eval set over the stream rows ``window`` (stage-1 scores given for every stream row)."""
    rng = np.random.default_rng(seed)
    s1 = stage1_all_rows[window]
    labels = data.labels[window]
    positives = np.flatnonzero(labels == 1)
    neg, neg_w = stratified_negatives(
        rng,
        np.flatnonzero(labels == 0),
        s1,
        top_share,
        negatives_per_stratum,
        negatives_per_stratum,
    )
    sample = np.r_[positives, neg].astype(np.int64)
    return EvalSet(
        stage1_all=s1,
        labels_all=labels,
        patterns_all=data.patterns[window],
        sample_index=sample,
        sample_weight=np.r_[np.ones(len(positives)), neg_w],
        sequences=replay_sequences(records, window[sample]),
    )


def escalation_cut(stage1_all: NDArray[np.float32], rate: float) -> float:
    """The stage-1 score above which the top ``rate`` of traffic lies."""
    return float(np.quantile(stage1_all, 1.0 - rate))


def cascade_scores(
    stage1: NDArray[np.float32],
    stage2: NDArray[np.float32],
    low: float,
    high: float = 1.01,
) -> NDArray[np.float32]:
    """Final scores: stage 2's where stage 1 lies in ``[low, high)``, else stage 1's."""
    escalated = (stage1 >= low) & (stage1 < high)
    return np.where(escalated, stage2, stage1).astype(np.float32)


def threshold_at_fpr(
    scores: NDArray[np.float32],
    labels: NDArray[np.int8],
    weights: NDArray[np.float64],
    fpr: float,
) -> float:
    """Lowest score threshold (``score >= t`` flags) whose weighted FPR is <= ``fpr``."""
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    neg = np.cumsum((1 - labels[order]) * weights[order])
    ok = np.r_[s[1:] != s[:-1], True] & (neg / neg[-1] <= fpr)
    if not ok.any():
        return float(np.nextafter(np.float32(s[0]), np.float32(2.0)))
    return float(s[np.flatnonzero(ok)[-1]])


def metrics_table(
    scores: NDArray[np.float32],
    labels: NDArray[np.int8],
    patterns: NDArray[np.str_],
    weights: NDArray[np.float64] | None = None,
) -> dict[str, dict[str, float]]:
    """PR-AUC, ROC-AUC, recall at 0.1% / 1% FPR: overall and per fraud pattern (vs all genuine)."""
    table: dict[str, dict[str, float]] = {}
    genuine = labels == 0
    for name in ["all", *(p.value for p in FraudPattern)]:
        if name != "all" and not (patterns == name).any():
            continue
        rows = np.ones_like(genuine) if name == "all" else genuine | (patterns == name)
        w = None if weights is None else weights[rows]
        s, y = scores[rows], labels[rows]
        table[name] = {
            "n_fraud": float(y.sum()),
            "pr_auc": average_precision(s, y, w),
            "roc_auc": roc_auc(s, y, w),
            "recall_at_0.1%_fpr": recall_at_fpr(s, y, 0.001, w),
            "recall_at_1%_fpr": recall_at_fpr(s, y, 0.01, w),
        }
    return table


def pick_policy(eval_set: EvalSet, escalation_rate: float, version: str) -> Policy:
    """A policy for ``escalation_rate``: escalate the top of stage 1, cut at 1% / 0.1% FPR.

    Thresholds are picked on the cascade's final score over the weighted sample; REVIEW is never
    below the escalation cut (only escalated transactions are flagged).
    """
    if eval_set.stage2 is None:
        raise ValueError("the eval set has no stage-2 scores")
    low = escalation_cut(eval_set.stage1_all, escalation_rate)
    final = cascade_scores(eval_set.stage1, eval_set.stage2, low)
    labels, weights = eval_set.labels, eval_set.sample_weight
    review = max(threshold_at_fpr(final, labels, weights, 0.01), low)
    decline = max(threshold_at_fpr(final, labels, weights, 0.001), review)
    return Policy(
        version=version,
        escalate_low=float(f"{low:.6g}"),
        escalate_high=1.0,
        review_threshold=float(f"{review:.6g}"),
        decline_threshold=float(f"{decline:.6g}"),
    )
