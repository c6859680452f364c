"""Population stability of the stage-1 score and the main screening features against a training
reference: the reference's format (a versioned JSON artifact next to the stage-1 model,
``models/screening/<version>/drift_reference.json``) and the PSI computation. Pure: no I/O
beyond reading and writing that one file.

PSI = sum over bins of (a - e) * ln(a / e), with e the reference's share of a bin and a the
window's, both floored at :data:`PSI_FLOOR` (an empty bin would make it infinite). Rules of
thumb: < 0.1 stable, 0.1-0.2 moderate shift, > 0.2 a shift worth acting on.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "DRIFT_REFERENCE_FILE",
    "DRIFT_REFERENCE_FORMAT",
    "PSI_FLOOR",
    "BinnedReference",
    "DriftReference",
    "FeatureReference",
    "bin_counts",
    "load_drift_reference",
    "psi",
    "reference_bins",
]

DRIFT_REFERENCE_FILE: Final = "drift_reference.json"
DRIFT_REFERENCE_FORMAT: Final = "cascade.drift-reference/1"
PSI_FLOOR: Final = 1e-4


class BinnedReference(BaseModel):
    """Bins of one variable: ``edges`` are the inner cut points (ascending, distinct); bin ``i``
    holds ``edges[i-1] <= x < edges[i]`` (the first from -inf, the last to +inf), and
    ``proportions[i]`` is the reference's share of it (``len(edges) + 1`` values summing to 1)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    edges: list[float] = Field(description="Inner cut points, ascending and distinct.")
    proportions: list[float] = Field(description="Reference share per bin, len(edges) + 1.")

    @model_validator(mode="after")
    def _consistent(self) -> BinnedReference:
        if len(self.proportions) != len(self.edges) + 1:
            raise ValueError("proportions must have len(edges) + 1 values")
        if any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError("edges must be ascending and distinct")
        if not math.isclose(sum(self.proportions), 1.0, abs_tol=1e-6):
            raise ValueError("proportions must sum to 1")
        return self


class FeatureReference(BaseModel):
    """One monitored screening feature: where it sits in the feature row and its bins."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    index: int = Field(ge=0, description="Column in the feature row (SCREENING_FEATURE_NAMES).")
    importance: float = Field(description="Permutation importance (PR-AUC drop) on training.")
    bins: BinnedReference


class DriftReference(BaseModel):
    """The training reference of one stage-1 version (``python -m training drift-reference``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: str = Field(DRIFT_REFERENCE_FORMAT, pattern=r"^cascade\.drift-reference/1$")
    stage1_version: str
    feature_set: str
    rows: int = Field(ge=1, description="Training rows the bins were computed from.")
    source: dict[str, Any] = Field(description="What the rows were (simulator config, days).")
    score: BinnedReference = Field(description="Bins of the stage-1 score.")
    features: list[FeatureReference] = Field(
        description="The monitored features, most important first."
    )


def reference_bins(values: npt.NDArray[np.floating[Any]], n_bins: int = 10) -> BinnedReference:
    """Quantile bins of ``values`` (fewer when values tie: a 0/1 feature gets two)."""
    finite = values[np.isfinite(values)].astype(np.float64)
    if finite.size == 0:
        raise ValueError("no finite values to bin")
    distinct = np.unique(finite)
    if len(distinct) <= n_bins:
        # A discrete feature (a flag, a small count): one bin per value, however rare.
        edges = distinct[1:]
    else:
        # Cut points are data values (no interpolation), so ties stay in one bin.
        cuts = np.quantile(finite, np.linspace(0, 1, n_bins + 1)[1:-1], method="inverted_cdf")
        edges = np.unique(cuts)
    # A cut equal to the minimum makes an empty first bin; drop it.
    edges = edges[edges > finite.min()]
    counts = bin_counts(finite, edges.tolist())
    shares = counts / counts.sum()
    return BinnedReference(edges=edges.tolist(), proportions=shares.tolist())


def bin_counts(
    values: npt.NDArray[np.floating[Any]], edges: list[float]
) -> npt.NDArray[np.float64]:
    """How many of the finite ``values`` fall in each bin of ``edges`` (see BinnedReference)."""
    finite = values[np.isfinite(values)]
    index = np.searchsorted(np.asarray(edges, dtype=np.float64), finite, side="right")
    return np.bincount(index, minlength=len(edges) + 1).astype(np.float64)


def psi(reference: BinnedReference, values: npt.NDArray[np.floating[Any]]) -> float:
    """The population stability index of ``values`` against ``reference`` (NaN when empty)."""
    counts = bin_counts(values, reference.edges)
    total = counts.sum()
    if total == 0:
        return float("nan")
    actual = np.maximum(counts / total, PSI_FLOOR)
    expected = np.maximum(np.asarray(reference.proportions, dtype=np.float64), PSI_FLOOR)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def load_drift_reference(model_dir: Path, stage1_version: str) -> DriftReference | None:
    """The reference stored beside ``stage1_version``'s model, or None when there is none."""
    path = model_dir / "screening" / stage1_version / DRIFT_REFERENCE_FILE
    if not path.exists():
        return None
    return DriftReference.model_validate_json(path.read_text())
