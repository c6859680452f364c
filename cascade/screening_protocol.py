"""Pure encode/parse functions for the screening hop (orchestrator <-> worker over NATS).

Messages are ``cascade.v1.ScreeningRequest`` / ``ScreeningReply`` protobufs; the model version is
both in the subject (``{prefix}.{version}``, so a worker only receives rows meant for its model)
and in the message (checked again by the worker).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cascade.v1 import stages_pb2


def screening_subject(prefix: str, model_version: str) -> str:
    """The NATS subject that workers serving ``model_version`` listen on."""
    return f"{prefix}.{model_version}"


def encode_screening_request(
    rows: npt.NDArray[np.float32], model_version: str, feature_set: str
) -> bytes:
    """Encode a [n, F] float32 feature matrix."""
    if rows.ndim != 2:
        raise ValueError(f"rows must be 2-D, got shape {rows.shape}")
    message = stages_pb2.ScreeningRequest(
        model_version=model_version, feature_set=feature_set, n_features=rows.shape[1]
    )
    message.features.extend(rows.astype(np.float32, copy=False).ravel().tolist())
    return message.SerializeToString()


@dataclass(frozen=True, slots=True)
class ScreeningRequest:
    """A decoded screening request."""

    model_version: str
    feature_set: str
    rows: npt.NDArray[np.float32]


def parse_screening_request(data: bytes) -> ScreeningRequest:
    """Decode a request; ValueError if it is malformed."""
    message = stages_pb2.ScreeningRequest()
    try:
        message.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError, a bare Exception subclass
        raise ValueError(f"not a ScreeningRequest: {exc}") from exc
    n_features = message.n_features
    values = np.asarray(message.features, dtype=np.float32)
    if n_features == 0 or values.size % n_features:
        raise ValueError(f"{values.size} values do not fill rows of {n_features} features")
    return ScreeningRequest(
        model_version=message.model_version,
        feature_set=message.feature_set,
        rows=values.reshape(-1, n_features),
    )


def encode_screening_reply(
    model_version: str,
    scores: npt.NDArray[np.float32] | None = None,
    *,
    error: str = "",
    inference_us: int = 0,
) -> bytes:
    """Encode the worker's reply: scores, or an error string."""
    message = stages_pb2.ScreeningReply(
        model_version=model_version, error=error, inference_us=inference_us
    )
    if scores is not None:
        message.scores.extend(scores.astype(np.float32, copy=False).ravel().tolist())
    return message.SerializeToString()


@dataclass(frozen=True, slots=True)
class ScreeningReply:
    """A decoded worker reply."""

    model_version: str
    scores: npt.NDArray[np.float32]
    error: str
    inference_us: int


def parse_screening_reply(data: bytes) -> ScreeningReply:
    """Decode a reply; ValueError if it is malformed."""
    message = stages_pb2.ScreeningReply()
    try:
        message.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError, a bare Exception subclass
        raise ValueError(f"not a ScreeningReply: {exc}") from exc
    return ScreeningReply(
        model_version=message.model_version,
        scores=np.asarray(message.scores, dtype=np.float32),
        error=message.error,
        inference_us=message.inference_us,
    )
