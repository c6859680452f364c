"""Pure encode/parse functions for the screening hop (orchestrator <-> worker over NATS).

Messages are ``cascade.v1.ScreeningRequest`` / ``ScreeningReply`` protobufs; the model version is
both in the subject (``{prefix}.{version}``, so a worker only receives rows meant for its model)
and in the message (checked again by the worker).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from cascade.v1 import stages_pb2

# Explicit byte order on the wire; a no-op view on the little-endian machines we run on.
_F32LE: Final = np.dtype("<f4")


def screening_subject(prefix: str, model_version: str) -> str:
    """The NATS subject that workers serving ``model_version`` listen on."""
    return f"{prefix}.{model_version}"


_WORKER_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_LEAVING: Final = b"-"


def worker_subject(subject: str, worker_id: str) -> str:
    """The subject one worker of ``subject``'s queue group also listens on, alone."""
    return f"{subject}.w.{worker_id}"


def members_subject(subject: str) -> str:
    """The subject the workers of ``subject`` send their heartbeats to."""
    return f"{subject}.members"


def worker_id_for(host: str, pid: int, suffix: str) -> str:
    """A worker id that is a valid subject token: host, pid and a random suffix."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{host[:32]}-{pid}-{suffix}")[:64]


def encode_heartbeat(worker_id: str, *, leaving: bool = False) -> bytes:
    """A heartbeat ("I serve here") or, with ``leaving``, a goodbye."""
    return (_LEAVING if leaving else b"") + worker_id.encode()


def parse_heartbeat(data: bytes) -> tuple[str, bool]:
    """``(worker_id, leaving)``; ValueError unless the id is a valid subject token."""
    leaving = data.startswith(_LEAVING)
    worker_id = (data[1:] if leaving else data).decode("ascii", errors="replace")
    if not _WORKER_ID.fullmatch(worker_id):
        raise ValueError(f"not a worker id: {worker_id[:70]!r}")
    return worker_id, leaving


def encode_screening_request(
    rows: npt.NDArray[np.float32], model_version: str, feature_set: str
) -> bytes:
    """Encode a [n, F] float32 feature matrix."""
    if rows.ndim != 2:
        raise ValueError(f"rows must be 2-D, got shape {rows.shape}")
    return stages_pb2.ScreeningRequest(
        model_version=model_version,
        feature_set=feature_set,
        n_features=rows.shape[1],
        features_f32le=np.ascontiguousarray(rows, dtype=_F32LE).tobytes(),
    ).SerializeToString()


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
    raw = message.features_f32le
    if len(raw) % 4:
        raise ValueError(f"{len(raw)} feature bytes are not whole float32 values")
    values = np.frombuffer(raw, dtype=_F32LE).astype(np.float32, copy=False)
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
        message.scores_f32le = np.ascontiguousarray(scores, dtype=_F32LE).tobytes()
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
    raw = message.scores_f32le
    if len(raw) % 4:
        raise ValueError(f"{len(raw)} score bytes are not whole float32 values")
    return ScreeningReply(
        model_version=message.model_version,
        scores=np.frombuffer(raw, dtype=_F32LE).astype(np.float32, copy=False),
        error=message.error,
        inference_us=message.inference_us,
    )
