"""The naive baseline's JSON encodings round-trip and reject malformed input."""

from __future__ import annotations

import numpy as np
import pytest

from loadtests.naive.protocol import (
    decode_cached,
    encode_cached,
    encode_reply,
    encode_request,
    parse_reply,
    parse_request,
)
from orchestrator.results import DecidedBy, ScoreResult
from orchestrator.routing import Decision


def test_request_round_trips() -> None:
    rows = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    request = parse_request(encode_request(rows, "s1-1", "fs-1"))
    assert (request.model_version, request.feature_set) == ("s1-1", "fs-1")
    assert np.array_equal(request.rows, rows)
    assert request.rows.dtype == np.float32


def test_reply_round_trips_scores_and_errors() -> None:
    scores = np.array([0.25, 0.5], dtype=np.float32)
    reply = parse_reply(encode_reply("s1-1", scores, inference_us=12))
    assert np.array_equal(reply.scores, scores) and reply.error == ""
    failed = parse_reply(encode_reply("s1-1", error="bad"))
    assert failed.error == "bad" and failed.scores.size == 0


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[1, 2]",
        b'{"rows": [[1]]}',
        b'{"model_version": "v", "feature_set": "f", "rows": [[1], [1, 2]]}',
        b'{"model_version": "v", "feature_set": "f", "rows": []}',
    ],
)
def test_malformed_requests_raise_value_error(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"request|rows|JSON"):
        parse_request(data)


def test_malformed_reply_raises_value_error() -> None:
    with pytest.raises(ValueError, match="reply"):
        parse_reply(b'{"scores": [0.1]}')


def test_two_d_rows_are_required() -> None:
    with pytest.raises(ValueError, match="2-D"):
        encode_request(np.zeros(3, dtype=np.float32), "v", "f")


def test_cache_entry_round_trips_as_a_cache_answer() -> None:
    result = ScoreResult(
        transaction_id="tx-1",
        decision=Decision.REVIEW,
        score=0.7,
        decided_by=DecidedBy.STAGE2,
        stage1_score=0.4,
        escalated=True,
    )
    again = decode_cached(encode_cached(result), "tx-2")
    assert again.transaction_id == "tx-2" and again.decided_by is DecidedBy.CACHE
    assert (again.decision, again.score, again.stage1_score, again.escalated) == (
        Decision.REVIEW,
        0.7,
        0.4,
        True,
    )


def test_unreadable_cache_entry_raises_value_error() -> None:
    with pytest.raises(ValueError, match="cache entry"):
        decode_cached(b'{"decision": "MAYBE", "score": 1}', "tx")
