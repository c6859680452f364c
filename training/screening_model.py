"""Stage 1: gradient-boosted trees on the screening features, exported to ONNX.

This module owns the stage-1 estimator and its ONNX contract: input ``features`` float32
``[N, N_SCREENING_FEATURES]``, output ``score`` float32 ``[N, 1]`` (fraud probability). skl2onnx
converts the classifier without ZipMap; a Slice on the positive-class column then replaces the
converter's ``label`` / ``probabilities`` outputs, so serving reads one tensor.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

import numpy as np
import onnx
from onnx import TensorProto, helper
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.ensemble import HistGradientBoostingClassifier

from cascade.features import N_SCREENING_FEATURES

if TYPE_CHECKING:
    from pathlib import Path

    from numpy.typing import NDArray

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "export_screening", "train_screening"]

logger = logging.getLogger(__name__)

INPUT_NAME: Final = "features"
OUTPUT_NAME: Final = "score"
_OPSET: Final = 17


def train_screening(
    features: NDArray[np.float32], labels: NDArray[np.int8], *, seed: int, max_iter: int = 250
) -> HistGradientBoostingClassifier:
    """Fit the stage-1 trees (unweighted, so scores stay calibrated to the true fraud rate)."""
    model = HistGradientBoostingClassifier(
        learning_rate=0.08,
        max_iter=max_iter,
        max_leaf_nodes=31,
        min_samples_leaf=40,
        l2_regularization=1.0,
        early_stopping=False,
        random_state=seed,
    )
    model.fit(features, labels)
    return model


def export_screening(model: HistGradientBoostingClassifier, path: Path) -> None:
    """Write ``model`` as ONNX with the stage-1 tensor contract."""
    sample = np.zeros((1, N_SCREENING_FEATURES), dtype=np.float32)
    onx = to_onnx(
        model,
        initial_types=[(INPUT_NAME, FloatTensorType([None, N_SCREENING_FEATURES]))],
        options={id(model): {"zipmap": False}},
        target_opset={"": _OPSET, "ai.onnx.ml": 3},
    )
    del sample
    graph = onx.graph
    probabilities = next(o.name for o in graph.output if o.name != "label")
    graph.node.append(
        helper.make_node(
            "Slice",
            [probabilities, "score_start", "score_end", "score_axis"],
            [OUTPUT_NAME],
            name="positive_class",
        )
    )
    for name, value in (("score_start", 1), ("score_end", 2), ("score_axis", 1)):
        graph.initializer.append(helper.make_tensor(name, TensorProto.INT64, [1], [value]))
    while graph.output:
        graph.output.pop()
    graph.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [None, 1]))
    onx.doc_string = "fraud screening (stage 1): features[N,F] -> score[N,1]"
    onnx.checker.check_model(onx)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onx.SerializeToString())
