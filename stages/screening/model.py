"""The stage-1 ONNX model in ONNX Runtime: load, warm, predict."""

from __future__ import annotations

from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from cascade.errors import ConfigurationError

INPUT_NAME: Final = "features"
OUTPUT_NAME: Final = "score"
_WARMUP_BATCHES: Final = (1, 8, 64)


class ScreeningModel:
    """An ONNX screening model: ``features`` [n, F] float32 -> ``score`` [n, 1]."""

    def __init__(self, path: Path, *, version: str, intra_op_threads: int = 1) -> None:
        options = ort.SessionOptions()
        # One request is tiny: threads would cost more in hand-offs than they save.
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise ConfigurationError(f"cannot load screening model {path}: {exc}") from exc
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name for o in self._session.get_outputs()}
        if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
            raise ConfigurationError(
                f"{path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, "
                f"found {sorted(inputs)} -> {sorted(outputs)}"
            )
        n_features = inputs[INPUT_NAME].shape[1]
        if not isinstance(n_features, int):
            raise ConfigurationError(f"{path}: input {INPUT_NAME!r} needs a fixed feature count")
        self.n_features: int = n_features
        self.version = version

    def warm(self) -> None:
        """Run a few batch sizes once so the first real request pays no allocation cost."""
        for n in _WARMUP_BATCHES:
            self.predict(np.zeros((n, self.n_features), dtype=np.float32))

    def predict(self, rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Fraud probability per row, shape [n]."""
        (scores,) = self._session.run([OUTPUT_NAME], {INPUT_NAME: rows})
        return np.asarray(scores, dtype=np.float32).reshape(rows.shape[0])
