"""Pure JSON encodings of the naive baseline: the screening hop and the output-cache entry."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from orchestrator.results import DecidedBy, ScoreResult
from orchestrator.routing import Decision

__all__ = [
    "NaiveReply",
    "NaiveRequest",
    "decode_cached",
    "encode_cached",
    "encode_reply",
    "encode_request",
    "parse_reply",
    "parse_request",
]


@dataclass(frozen=True, slots=True)
class NaiveRequest:
    """A decoded screening request."""

    model_version: str
    feature_set: str
    rows: npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class NaiveReply:
    """A decoded screening reply."""

    model_version: str
    scores: npt.NDArray[np.float32]
    error: str


def _load(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a JSON {what}: {exc}") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"a {what} must be a JSON object")
    return doc


def encode_request(rows: npt.NDArray[np.float32], model_version: str, feature_set: str) -> bytes:
    """``{"model_version", "feature_set", "rows": [[...], ...]}`` as UTF-8 JSON."""
    if rows.ndim != 2:
        raise ValueError(f"rows must be 2-D, got shape {rows.shape}")
    return json.dumps(
        {"model_version": model_version, "feature_set": feature_set, "rows": rows.tolist()}
    ).encode()


def parse_request(data: bytes) -> NaiveRequest:
    """Decode a request; ValueError if it is malformed or the rows are ragged."""
    doc = _load(data, "screening request")
    try:
        rows = np.asarray(doc["rows"], dtype=np.float32)
        model_version, feature_set = str(doc["model_version"]), str(doc["feature_set"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"bad screening request: {exc!r}") from exc
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError(f"rows must be a non-empty 2-D array, got shape {rows.shape}")
    return NaiveRequest(model_version, feature_set, rows)


def encode_reply(
    model_version: str,
    scores: npt.NDArray[np.float32] | None = None,
    *,
    error: str = "",
    inference_us: int = 0,
) -> bytes:
    """``{"model_version", "scores": [...], "error", "inference_us"}`` as UTF-8 JSON."""
    return json.dumps(
        {
            "model_version": model_version,
            "scores": [] if scores is None else scores.astype(np.float32).ravel().tolist(),
            "error": error,
            "inference_us": inference_us,
        }
    ).encode()


def parse_reply(data: bytes) -> NaiveReply:
    """Decode a reply; ValueError if it is malformed."""
    doc = _load(data, "screening reply")
    try:
        scores = np.asarray(doc.get("scores", []), dtype=np.float32).reshape(-1)
        return NaiveReply(str(doc["model_version"]), scores, str(doc.get("error", "")))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"bad screening reply: {exc!r}") from exc


def encode_cached(result: ScoreResult) -> bytes:
    """The cache entry for a (non-degraded) answer: decision, scores and route, as JSON."""
    return json.dumps(
        {
            "decision": result.decision.value,
            "score": result.score,
            "decided_by": result.decided_by.value,
            "escalated": result.escalated,
            "stage1_score": result.stage1_score,
        }
    ).encode()


def decode_cached(data: bytes, transaction_id: str) -> ScoreResult:
    """Rebuild a cached answer, labelled ``CACHE``; ValueError if the entry is unreadable."""
    doc = _load(data, "cache entry")
    try:
        stage1 = doc.get("stage1_score")
        return ScoreResult(
            transaction_id=transaction_id,
            decision=Decision(doc["decision"]),
            score=float(doc["score"]),
            decided_by=DecidedBy.CACHE,
            stage1_score=None if stage1 is None else float(stage1),
            escalated=bool(doc.get("escalated", False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"unreadable cache entry: {exc!r}") from exc
