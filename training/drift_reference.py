"""The drift reference of a stage-1 version: score and feature bins of its training rows
(``python -m training drift-reference``), written beside the model as
``models/screening/<version>/drift_reference.json`` (:mod:`cascade.drift`).

Which features: the :data:`TOP_FEATURES` with the largest permutation importance of the served
ONNX model on a sample of the training rows: the drop of stage-1 PR-AUC when that one column is
shuffled (model-agnostic, measured on the artifact that serves, not the estimator's internals;
HistGradientBoosting has no built-in importances). A feature the model does not lean on can
drift without changing a decision; these are the ones whose drift moves scores.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from cascade.drift import (
    DRIFT_REFERENCE_FILE,
    DriftReference,
    FeatureReference,
    reference_bins,
)
from cascade.features import SCREENING_FEATURE_NAMES
from cascade.model_registry import load_registry
from training.datasets import average_precision, replay_screening
from training.evaluation import stage1_scores
from training.simulator import SimulationConfig, simulate

__all__ = ["TOP_FEATURES", "build_drift_reference", "write_drift_reference"]

logger = logging.getLogger(__name__)

TOP_FEATURES: Final = 10
N_BINS: Final = 10
_IMPORTANCE_ROWS: Final = 200_000


def build_drift_reference(
    model_path: Path,
    stage1_version: str,
    feature_set: str,
    features: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int8],
    *,
    source: dict[str, object],
    seed: int = 0,
) -> DriftReference:
    """Bins of the stage-1 score and of the most important features of ``features``."""
    scores = stage1_scores(model_path, features.astype(np.float32))
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(features), size=min(_IMPORTANCE_ROWS, len(features)), replace=False)
    x, y = features[sample].astype(np.float32), labels[sample]
    base = average_precision(stage1_scores(model_path, x), y)
    importance = np.zeros(x.shape[1])
    for j in range(x.shape[1]):
        shuffled = x.copy()
        shuffled[:, j] = rng.permutation(shuffled[:, j])
        importance[j] = base - average_precision(stage1_scores(model_path, shuffled), y)
    top = np.argsort(-importance, kind="stable")[:TOP_FEATURES]
    return DriftReference(
        stage1_version=stage1_version,
        feature_set=feature_set,
        rows=len(features),
        source=source | {"pr_auc": base, "importance_rows": len(sample)},
        score=reference_bins(scores, N_BINS),
        features=[
            FeatureReference(
                name=SCREENING_FEATURE_NAMES[j],
                index=int(j),
                importance=float(importance[j]),
                bins=reference_bins(features[:, j], N_BINS),
            )
            for j in top
        ],
    )


def write_drift_reference(
    model_dir: Path, config: SimulationConfig, holdout_days: int, *, force: bool = False
) -> Path:
    """Compute the registered stage-1 version's reference from its training days (the days
    before the held-out ones) and write it beside the model; immutable unless ``force``."""
    registry = load_registry(model_dir)
    path = registry.stage1_path.parent / DRIFT_REFERENCE_FILE
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists: artifacts of a version are immutable (--force)")
    records = simulate(config)
    data = replay_screening(records)
    rows = np.flatnonzero(data.day < config.n_days - holdout_days)
    logger.info("drift reference from %d training rows", len(rows))
    reference = build_drift_reference(
        registry.stage1_path,
        registry.stage1.version,
        registry.feature_set,
        data.features[rows],
        data.labels[rows],
        source={"simulation": asdict(config), "days": [0, config.n_days - holdout_days]},
    )
    path.write_text(reference.model_dump_json(indent=2) + "\n")
    return path
