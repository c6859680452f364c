"""Triton Python-backend model for the heavyweight stage: ONNX Runtime on CPU, one run per batch.

Triton loads this file from ``<repository>/<model>/<version>/model.py`` and ``model.onnx`` beside
it. ``execute`` receives every request of a dynamic batch; their ``sequence`` tensors are
concatenated into a single ONNX Runtime run and ``score`` is split back per request, which is what
makes dynamic batching pay. A request with a bad tensor gets its own error response; the others
are still scored.

Config parameters (strings, as Triton passes them): ``intra_op_threads`` (ONNX Runtime threads,
default 1) and ``delay_ms`` (sleep this long per execute, default 0: lets tests make stage 2 slower
than its budget).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

logger = logging.getLogger(__name__)

INPUT_NAME: Final = "sequence"
OUTPUT_NAME: Final = "score"
MODEL_FILE: Final = "model.onnx"


def _parameter(config: dict[str, Any], key: str, default: str) -> str:
    """A model-config parameter's ``string_value`` (Triton's parameters are strings)."""
    entry = config.get("parameters", {}).get(key)
    if not entry:
        return default
    value = str(entry.get("string_value", "")).strip()
    return value or default


class TritonPythonModel:
    """The model Triton instantiates once per instance (``instance_group.count``)."""

    def initialize(self, args: dict[str, str]) -> None:
        """Load ``model.onnx`` from the version folder, read the parameters and warm the session."""
        config: dict[str, Any] = json.loads(args["model_config"])
        self.max_batch_size: int = max(1, int(config.get("max_batch_size", 1)))
        self.delay_s: float = max(0.0, float(_parameter(config, "delay_ms", "0"))) / 1000.0
        intra_op_threads = int(_parameter(config, "intra_op_threads", "1"))
        dims = pb_utils.get_input_config_by_name(config, INPUT_NAME)["dims"]
        self.item_shape: tuple[int, ...] = tuple(int(d) for d in dims)

        # Resolve a symlinked artifact so ONNX external-data files are found beside the real file.
        model_path = (Path(args["model_repository"]) / args["model_version"] / MODEL_FILE).resolve()
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        for batch in {1, self.max_batch_size}:
            self._run(np.zeros((batch, *self.item_shape), dtype=np.float32))
        logger.info(
            "loaded %s (%s): item shape %s, max batch %d, %d intra-op threads, delay %.1f ms",
            model_path,
            args.get("model_instance_name", "?"),
            self.item_shape,
            self.max_batch_size,
            intra_op_threads,
            self.delay_s * 1000.0,
        )

    def _run(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        scores = self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        return np.asarray(scores, dtype=np.float32).reshape(batch.shape[0], 1)

    def _input(self, request: Any) -> npt.NDArray[np.float32]:
        tensor = pb_utils.get_input_tensor_by_name(request, INPUT_NAME)
        if tensor is None:
            raise ValueError(f"input {INPUT_NAME!r} is missing")
        array = np.asarray(tensor.as_numpy())
        if array.ndim != 1 + len(self.item_shape) or array.shape[1:] != self.item_shape:
            raise ValueError(
                f"input {INPUT_NAME!r} has shape {list(array.shape)}, "
                f"expected [N, {', '.join(map(str, self.item_shape))}]"
            )
        return np.asarray(array, dtype=np.float32)

    def execute(self, requests: list[Any]) -> list[Any]:
        """Score every request of the batch in one ONNX Runtime run; one response per request."""
        if self.delay_s:
            time.sleep(self.delay_s)
        responses: list[Any] = [None] * len(requests)
        valid: list[tuple[int, npt.NDArray[np.float32]]] = []
        for index, request in enumerate(requests):
            try:
                valid.append((index, self._input(request)))
            except Exception as exc:
                responses[index] = pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(str(exc))
                )
        if valid:
            try:
                scores = self._run(np.concatenate([array for _, array in valid], axis=0))
            except Exception as exc:
                logger.exception("ONNX Runtime failed on a batch of %d requests", len(valid))
                for index, _ in valid:
                    responses[index] = pb_utils.InferenceResponse(
                        output_tensors=[], error=pb_utils.TritonError(f"inference failed: {exc}")
                    )
            else:
                offset = 0
                for index, array in valid:
                    rows = array.shape[0]
                    part = scores[offset : offset + rows]
                    offset += rows
                    responses[index] = pb_utils.InferenceResponse(
                        output_tensors=[pb_utils.Tensor(OUTPUT_NAME, part)]
                    )
        return responses

    def finalize(self) -> None:
        """Release the ONNX Runtime session."""
        self.session = None
