"""``cascade rollout shadow``: score the registry's candidate on the champion's traffic, off the
request path, from the decision log.

It reads the JetStream stream ``DECISIONS`` (an ordered consumer, as ``cascade decisions``
does), and for every record the champion answered normally (not degraded, not from the cache,
features present) it scores the candidate on the same input: the candidate's stage 1 in ONNX
Runtime here on the record's 47 features, its policy's band and thresholds, and, when the
candidate escalates, a stage-2 score: the candidate's stage-2 model in ONNX Runtime here on the
card's sequence read from Redis (``--redis``; the history as the transaction saw it, by the
store's own visibility rule), or the champion's stage-2 score from the record when the candidate
keeps the champion's stage 2. Each result is one JSON line (``--out``) beside the champion's
answer, read by ``cascade rollout report``. Nothing here touches a live answer: the records are
already answered, and the process shares no connection with the orchestrators.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import redis.asyncio as aioredis

from cascade.features import sequence_tensor, visible_history
from cascade.model_registry import Policy, Registry, load_policy, load_registry
from cascade.v1 import scoring_pb2
from devstack.decision_rows import DecisionFilter
from devstack.decisions import read_decision_rows
from orchestrator.online_store import card_history_key, decode_history
from orchestrator.validation import validate_transaction
from stages.screening.model import ScreeningModel

__all__ = ["ShadowScorer", "ShadowStats", "run_shadow"]

logger = logging.getLogger(__name__)

_HEAVY_INPUT: Final = "sequence"
_HEAVY_OUTPUT: Final = "score"


def versions_label(policy: str, stage1: str, stage2: str, feature_set: str) -> str:
    """Versions as the span attribute and the report write them."""
    return f"{policy}/{stage1}/{stage2}/{feature_set}"


@dataclass(slots=True)
class ShadowStats:
    """What one shadow run did."""

    read: int = 0
    scored: int = 0
    skipped: int = 0


class ShadowScorer:
    """The registry's candidate, loaded for shadow scoring (ONNX Runtime, one thread)."""

    def __init__(self, registry: Registry) -> None:
        candidate = registry.candidate_set()
        if candidate is None or registry.candidate is None:
            raise ValueError("the registry has no candidate to shadow")
        self._registry = registry
        self.champion_policy: Policy = load_policy(registry.champion().policy_path)
        self.policy: Policy = load_policy(candidate.policy_path)
        self.stage1 = ScreeningModel(candidate.stage1_path, version=candidate.stage1.version)
        self.stage1.warm()
        self.own_stage1 = registry.candidate.stage1 is not None
        self.own_stage2 = registry.candidate.stage2 is not None
        self._heavy: ort.InferenceSession | None = None
        if self.own_stage2:
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            self._heavy = ort.InferenceSession(
                str(candidate.stage2_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        champion = registry.champion()
        self.champion_versions = versions_label(
            self.champion_policy.version,
            champion.stage1.version,
            champion.stage2.version,
            registry.feature_set,
        )
        self.candidate_versions = versions_label(
            self.policy.version,
            candidate.stage1.version,
            candidate.stage2.version,
            registry.feature_set,
        )

    def heavy(self, sequence: npt.NDArray[np.float32]) -> float:
        """The candidate's stage-2 score for one sequence [seq_len, token_dim]."""
        assert self._heavy is not None
        (out,) = self._heavy.run([_HEAVY_OUTPUT], {_HEAVY_INPUT: sequence[None, ...]})
        return float(np.asarray(out).reshape(-1)[0])


def _wire_transaction(row: Mapping[str, object]) -> scoring_pb2.Transaction:
    return scoring_pb2.Transaction(
        transaction_id=str(row["transaction_id"]),
        card_id=str(row["card_id"]),
        merchant_id=str(row["merchant_id"]),
        merchant_category=str(row["merchant_category"]),
        amount_minor=int(row["amount_minor"]),  # type: ignore[call-overload]
        currency=str(row["currency"]),
        country=str(row["country"]),
        channel=scoring_pb2.Channel.Value(f"CHANNEL_{row['channel']}"),
        timestamp_ms=int(row["timestamp_ms"]),  # type: ignore[call-overload]
        device_id=str(row["device_id"]),
        ip_country=str(row["ip_country"]),
    )


async def shadow_row(
    scorer: ShadowScorer, row: Mapping[str, object], redis: aioredis.Redis | None
) -> dict[str, object] | None:
    """The candidate's answer beside the champion's for one decision row, or None when the
    row is not comparable (degraded, cached, default, another lane's versions)."""
    label = versions_label(
        str(row["policy_version"]),
        str(row["stage1_version"]),
        str(row["stage2_version"]),
        str(row["feature_set"]),
    )
    features = row["features"]
    if (
        row["degraded"]
        or row["decided_by"] not in ("STAGE1", "STAGE2")
        or not isinstance(features, list)
        or not features
        or label != scorer.champion_versions
    ):
        return None
    start_ns = time.perf_counter_ns()
    if scorer.own_stage1:
        rows = np.asarray([features], dtype=np.float32)
        stage1 = float(scorer.stage1.predict(rows)[0])
    else:
        stage1 = float(row["stage1_score"])  # type: ignore[arg-type]
    escalated = scorer.policy.escalates(stage1)
    final, stage2, missing = stage1, None, False
    if escalated:
        if scorer.own_stage2 and redis is not None:
            tx = validate_transaction(_wire_transaction(row))
            key = card_history_key(tx.card_id, str(row["feature_set"]))
            raw = [
                e if isinstance(e, bytes) else e.encode() for e in await redis.lrange(key, 0, -1)
            ]
            history = decode_history(raw)
            stage2 = scorer.heavy(sequence_tensor(tx, visible_history(tx, history)))
        elif not scorer.own_stage2 and row["stage2_score"] is not None:
            stage2 = float(row["stage2_score"])  # type: ignore[arg-type]
        if stage2 is None:
            missing = True
        else:
            final = stage2
    latency_us = (time.perf_counter_ns() - start_ns) / 1000
    return {
        "transaction_id": row["transaction_id"],
        "card_id": row["card_id"],
        "decided_at_ms": row["decided_at_ms"],
        "champion_versions": scorer.champion_versions,
        "champion_decision": row["decision"],
        "champion_score": row["score"],
        "champion_stage1_score": row["stage1_score"],
        "champion_escalated": row["escalated"],
        "candidate_versions": scorer.candidate_versions,
        "candidate_decision": scorer.policy.decide(final).value,
        "candidate_score": final,
        "candidate_stage1_score": stage1,
        "candidate_stage2_score": stage2,
        "candidate_escalated": escalated,
        "candidate_stage2_missing": missing,
        "candidate_latency_us": latency_us,
    }


async def run_shadow(
    nats_url: str,
    model_dir: Path,
    out: IO[str],
    *,
    redis_url: str | None = None,
    stream: str = "DECISIONS",
    subject_prefix: str = "decisions",
    since_ms: int | None = None,
    follow: bool = False,
    limit: int | None = None,
) -> ShadowStats:
    """Score the candidate on the stream's records, one JSON line each to ``out``."""
    scorer = ShadowScorer(load_registry(model_dir))
    stats = ShadowStats()
    redis = aioredis.from_url(redis_url) if redis_url else None
    if scorer.own_stage2 and redis is None:
        logger.warning("a stage-2 candidate needs --redis for the card histories")
    try:
        rows = read_decision_rows(
            nats_url,
            stream=stream,
            subject_prefix=subject_prefix,
            where=DecisionFilter(since_ms=since_ms),
            follow=follow,
        )
        async for row in rows:
            stats.read += 1
            result = await shadow_row(scorer, row, redis)
            if result is None:
                stats.skipped += 1
                continue
            out.write(json.dumps(result) + "\n")
            out.flush()
            stats.scored += 1
            if limit is not None and stats.scored >= limit:
                break
    finally:
        if redis is not None:
            await redis.aclose()
    return stats
