"""Turning a labelled stream into model inputs by replaying it through the one feature code.

This module owns the offline replay: transactions are visited in time order, each is featurised
from its card's history *before* it joins that history (exactly the online order: read, score,
then append), so the training inputs are the serving inputs. It also owns the time split and
the weighted metrics every report and model card uses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from cascade.features import (
    N_SCREENING_FEATURES,
    SEQUENCE_LEN,
    TOKEN_DIM,
    CardHistories,
    screening_features,
    sequence_tensor,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from numpy.typing import NDArray

    from training.simulator import LabelledTransaction

__all__ = [
    "ScreeningData",
    "average_precision",
    "recall_at_fpr",
    "replay_screening",
    "replay_sequences",
    "roc_auc",
]

logger = logging.getLogger(__name__)

_MS_DAY: Final = 86_400_000


@dataclass(frozen=True, slots=True)
class ScreeningData:
    """Stage-1 inputs and labels for every transaction of a stream, in stream order."""

    features: NDArray[np.float32]  # [n, N_SCREENING_FEATURES]
    labels: NDArray[np.int8]  # [n] 1 = fraud
    patterns: NDArray[np.str_]  # [n] "" for genuine
    day: NDArray[np.int32]  # [n] whole days since the first transaction


def replay_screening(records: Sequence[LabelledTransaction]) -> ScreeningData:
    """Screening features of every transaction, computed from its card's history at that time."""
    n = len(records)
    features = np.empty((n, N_SCREENING_FEATURES), dtype=np.float32)
    histories = CardHistories()
    for i, record in enumerate(records):
        tx = record.tx
        features[i] = screening_features(tx, histories.history_for(tx))
        histories.append(tx)
    start = records[0].tx.timestamp_ms if n else 0
    return ScreeningData(
        features=features,
        labels=np.fromiter((r.is_fraud for r in records), dtype=np.int8, count=n),
        patterns=np.array([r.pattern for r in records], dtype=np.str_),
        day=np.fromiter(
            ((r.tx.timestamp_ms - start) // _MS_DAY for r in records), dtype=np.int32, count=n
        ),
    )


def replay_sequences(
    records: Sequence[LabelledTransaction], indices: NDArray[np.int64]
) -> NDArray[np.float32]:
    """Sequence tensors of the transactions at ``indices`` (sorted or not), in that order."""
    wanted = {int(i): k for k, i in enumerate(indices)}
    out = np.empty((len(indices), SEQUENCE_LEN, TOKEN_DIM), dtype=np.float32)
    histories = CardHistories()
    last = max(wanted, default=-1)
    for i, record in enumerate(records[: last + 1]):
        tx = record.tx
        slot = wanted.get(i)
        if slot is not None:
            out[slot] = sequence_tensor(tx, histories.history_for(tx))
        histories.append(tx)
    return out


def _sorted_by_score(
    scores: NDArray[np.floating[Any]],
    labels: NDArray[np.integer[Any]],
    weights: NDArray[np.floating[Any]] | None,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    order = np.argsort(-scores, kind="stable")
    y = labels[order].astype(np.float64)
    w = np.ones_like(y) if weights is None else weights[order].astype(np.float64)
    return scores[order].astype(np.float64), y, w


def recall_at_fpr(
    scores: NDArray[np.floating[Any]],
    labels: NDArray[np.integer[Any]],
    fpr: float,
    weights: NDArray[np.floating[Any]] | None = None,
) -> float:
    """Share of fraud caught by the best threshold whose false-positive rate is <= ``fpr``.

    ``weights`` undo negative subsampling (a sampled genuine transaction standing for many).
    """
    s, y, w = _sorted_by_score(scores, labels, weights)
    tp = np.cumsum(y * w)
    fp = np.cumsum((1 - y) * w)
    total_pos, total_neg = tp[-1], fp[-1]
    if total_pos == 0 or total_neg == 0:
        return float("nan")
    # Only cut between distinct scores.
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    ok = last_of_tie & (fp / total_neg <= fpr)
    return float(tp[ok].max() / total_pos) if ok.any() else 0.0


def average_precision(
    scores: NDArray[np.floating[Any]],
    labels: NDArray[np.integer[Any]],
    weights: NDArray[np.floating[Any]] | None = None,
) -> float:
    """PR-AUC as average precision (sklearn's step definition), with optional sample weights."""
    s, y, w = _sorted_by_score(scores, labels, weights)
    tp = np.cumsum(y * w)
    fp = np.cumsum((1 - y) * w)
    if tp[-1] == 0:
        return float("nan")
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    tp, fp = tp[last_of_tie], fp[last_of_tie]
    precision = tp / (tp + fp)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_auc(
    scores: NDArray[np.floating[Any]],
    labels: NDArray[np.integer[Any]],
    weights: NDArray[np.floating[Any]] | None = None,
) -> float:
    """Area under the ROC curve, with optional sample weights (ties count half)."""
    s, y, w = _sorted_by_score(scores, labels, weights)
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(y * w)[last_of_tie]
    fp = np.cumsum((1 - y) * w)[last_of_tie]
    if tp[-1] == 0 or fp[-1] == 0:
        return float("nan")
    tpr = np.r_[0.0, tp / tp[-1]]
    fpr = np.r_[0.0, fp / fp[-1]]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) * 0.5))
