"""What the orchestrator serves: the champion's lane and, in a canary, the candidate's.

A :class:`Lane` is one complete set of versions (policy, stage 1, stage 2, feature set) with its
own stage clients (a :class:`~orchestrator.screening_client.NatsScreener` on that stage-1
version's subject, a Triton client for that stage-2 version) and its own
:class:`~orchestrator.scoring.CascadeScorer`, whose cache keys name that lane's versions. A
:class:`Generation` is what one ``registry.json`` makes of them; the orchestrator swaps the whole
generation when the file changes (:class:`cascade.registry_watch.RegistryWatch`), so a call is scored by one lane from
start to end and a version is never answered with another's cache entry.

With no candidate, or a canary share of 0, a generation holds the champion's lane alone and the
request path is what it was before rollouts existed: one attribute read picks the lane.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from contextlib import AsyncExitStack
from dataclasses import dataclass

import numpy as np
from opentelemetry import trace
from prometheus_client import Counter, Histogram

from cascade import metrics
from cascade.canary import in_canary
from cascade.decision import Decision
from cascade.errors import DependencyError
from cascade.features import N_SCREENING_FEATURES, SEQUENCE_LEN, TOKEN_DIM
from cascade.model_registry import Policy, Registry, ServingSet, load_policy
from cascade.settings import Settings
from cascade.v1 import scoring_pb2
from orchestrator.breaker import DependencyBreakers
from orchestrator.coalescing import CoalescingHeavyScorer, CoalescingScreener
from orchestrator.codec import versions_to_proto
from orchestrator.heavy_client import HeavyScorer, TritonHeavyScorer
from orchestrator.online_store import OnlineStore
from orchestrator.post_answer import PostAnswerWriter
from orchestrator.results import DecidedBy, ModelVersions, Reason, ScoreResult
from orchestrator.scoring import CascadeScorer
from orchestrator.screening_client import NatsScreener, Screener

__all__ = ["Generation", "Lane", "open_generation"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, eq=False)
class Lane:
    """One set of versions and the scorer that answers with them (compared by identity)."""

    role: str
    scorer: CascadeScorer
    versions: ModelVersions
    versions_pb: scoring_pb2.ModelVersions
    versions_attr: str
    screener: NatsScreener
    heavy: HeavyScorer

    def count(self, result: ScoreResult) -> None:
        """Count one answer in this lane's metrics (called only while a canary runs, so that the
        champion's and the candidate's decision mix, degraded reasons and latency compare)."""
        _lane_answers(self.role, self.versions_attr, result.decided_by, result.decision).inc()
        for reason in result.reasons:
            _lane_degraded(self.role, self.versions_attr, reason).inc()
        _lane_seconds(self.role, self.versions_attr).observe(result.timings.total_us / 1e6)


# Children bound once per label set: ``labels()`` takes a lock and builds a key on every call.
@functools.cache
def _lane_answers(role: str, versions: str, decided_by: DecidedBy, decision: Decision) -> Counter:
    return metrics.LANE_ANSWERS.labels(role, versions, decided_by.value, decision.value)


@functools.cache
def _lane_degraded(role: str, versions: str, reason: Reason) -> Counter:
    return metrics.LANE_DEGRADED.labels(role, versions, reason.value)


@functools.cache
def _lane_seconds(role: str, versions: str) -> Histogram:
    return metrics.LANE_SECONDS.labels(role, versions)


@dataclass(frozen=True, slots=True)
class Generation:
    """The lanes one registry file makes: the champion, and the candidate while a canary runs."""

    champion: Lane
    candidate: Lane | None
    canary_share: float

    def lane_for(self, card_id: str) -> Lane:
        """The lane that scores ``card_id``: sticky, by a hash of the card id."""
        if self.candidate is not None and in_canary(card_id, self.canary_share):
            return self.candidate
        return self.champion

    @property
    def lanes(self) -> tuple[Lane, ...]:
        """Every lane, champion first."""
        return (self.champion,) if self.candidate is None else (self.champion, self.candidate)


async def _open_lane(
    serving: ServingSet,
    policy: Policy,
    settings: Settings,
    *,
    store: OnlineStore,
    writer: PostAnswerWriter,
    tracer: trace.Tracer,
    stack: AsyncExitStack,
) -> Lane:
    s = settings
    versions = ModelVersions(
        policy=policy.version,
        stage1=serving.stage1.version,
        stage2=serving.stage2.version,
        feature_set=serving.feature_set,
    )
    screener = await stack.enter_async_context(
        NatsScreener(
            s.nats.url,
            subject_prefix=s.nats.subject_prefix,
            model_version=serving.stage1.version,
            feature_set=serving.feature_set,
            tracer=tracer,
            hedging=s.hedging if s.hedging.enabled else None,
            security=s.nats,
        )
    )
    heavy = await stack.enter_async_context(
        TritonHeavyScorer(
            s.triton.url,
            model_name=serving.stage2.triton_model or "",
            model_version=str(serving.stage2.triton_version),
            tracer=tracer,
        )
    )
    screening: Screener = screener
    heavyweight: HeavyScorer = heavy
    if s.coalescing.enabled:
        screening = await stack.enter_async_context(
            CoalescingScreener(screener, max_items=s.coalescing.max_items)
        )
        heavyweight = await stack.enter_async_context(
            CoalescingHeavyScorer(heavy, max_items=s.coalescing.max_items)
        )
    scorer = CascadeScorer(
        store=store,
        screener=screening,
        heavy=heavyweight,
        policy=policy,
        versions=versions,
        budget=s.budget,
        default_decision=s.default_decision,
        writer=writer,
        tracer=tracer,
        chunk_items=s.coalescing.batch_chunk_items,
        batch_stage2_items=s.coalescing.batch_stage2_items,
        batch_share=s.coalescing.batch_share,
        stage2_max_in_flight=s.admission.stage2_max_in_flight,
        # Each lane has breakers of its own: a failing candidate never opens the champion's.
        breakers=DependencyBreakers(s.breaker),
    )
    v = versions
    return Lane(
        role=serving.role,
        scorer=scorer,
        versions=versions,
        versions_pb=versions_to_proto(versions),
        versions_attr=f"{v.policy}/{v.stage1}/{v.stage2}/{v.feature_set}",
        screener=screener,
        heavy=heavy,
    )


async def open_generation(
    registry: Registry,
    settings: Settings,
    *,
    store: OnlineStore,
    writer: PostAnswerWriter,
    tracer: trace.Tracer,
    stack: AsyncExitStack,
    champion_policy: Policy | None = None,
) -> Generation:
    """The lanes ``registry`` asks for, their clients entered into ``stack``.

    The candidate's lane is opened only when the canary share (the registry's, else
    ``settings.rollout.canary_share``) is above 0 (a candidate in shadow needs nothing on the
    live path). ``champion_policy`` overrides the registry's (``CASCADE_POLICY_FILE``)."""
    share = registry.canary_share(settings.rollout.canary_share)
    champion_set = registry.champion()
    policy = champion_policy or load_policy(champion_set.policy_path)
    champion = await _open_lane(
        champion_set, policy, settings, store=store, writer=writer, tracer=tracer, stack=stack
    )
    candidate_set = registry.candidate_set()
    candidate = None
    if candidate_set is not None and share > 0.0:
        candidate_policy = (
            load_policy(candidate_set.policy_path)
            if registry.candidate is not None and registry.candidate.policy is not None
            else policy
        )
        candidate = await _open_lane(
            candidate_set,
            candidate_policy,
            settings,
            store=store,
            writer=writer,
            tracer=tracer,
            stack=stack,
        )
    return Generation(champion=champion, candidate=candidate, canary_share=share)


async def lanes_answer(
    generation: Generation, timeout_s: float | None, retry_s: float = 0.2
) -> None:
    """Wait until stage 1 and stage 2 of every lane answered one request (TimeoutError after
    ``timeout_s``)."""
    rows = np.zeros((1, N_SCREENING_FEATURES), dtype=np.float32)
    sequences = np.zeros((1, SEQUENCE_LEN, TOKEN_DIM), dtype=np.float32)
    async with asyncio.timeout(timeout_s):
        for lane in generation.lanes:
            while True:
                try:
                    await lane.screener.screen(rows, timeout_s=1.0)
                    await lane.heavy.score(sequences, timeout_s=2.0)
                    break
                except DependencyError as exc:
                    logger.debug("%s lane not answering yet: %s", lane.role, exc)
                    await asyncio.sleep(retry_s)


def describe(generation: Generation) -> str:
    """One log line's worth: the lanes and the share."""
    champion = generation.champion.versions_attr
    if generation.candidate is None:
        return f"champion {champion}"
    return (
        f"champion {champion}, candidate {generation.candidate.versions_attr} "
        f"for {generation.canary_share:.1%} of cards"
    )
