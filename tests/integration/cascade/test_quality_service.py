"""``cascade quality --serve``'s service on a real NATS JetStream where neither stream exists
when it starts (no label reported yet, or the job started before the orchestrator): it starts
anyway and follows each stream from the refresh that first finds it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from cascade.decision_record import PendingDecision, encode_decision
from cascade.errors import Dependency
from cascade.jetstream_streams import ensure_stream
from cascade.nats_connection import connect_nats
from cascade.outcome_record import VIA_GRPC
from cascade.outcome_store import OutcomeStore
from cascade.quality_job import QualityService
from cascade.settings import DecisionLogSettings, OutcomeSettings
from cascade.v1 import decisions_pb2
from cascade.v1 import scoring_pb2 as R
from devstack.servers import NatsServer
from orchestrator.decision_log import stream_config

pytestmark = pytest.mark.integration


async def test_streams_created_after_the_job_started_are_followed(tmp_path: Path) -> None:
    async with (
        NatsServer(jetstream=True, store_dir=tmp_path / "js", log_dir=tmp_path / "nats") as nats,
        QualityService(nats.url, windows_s=[3600], references={}, refresh_s=0.05) as service,
    ):
        await asyncio.wait_for(service.refreshed.wait(), 5)
        assert service.last_report is not None
        assert (service.last_report.decisions_held, service.last_report.outcomes_held) == (0, 0)

        async with OutcomeStore(nats.url, OutcomeSettings()) as outcomes:
            await outcomes.store(
                R.Outcome(transaction_id="t-1", label=R.OUTCOME_LABEL_CHARGEBACK),
                int(time.time() * 1000),
                VIA_GRPC,
            )
        settings = DecisionLogSettings()
        nc = await connect_nats(nats.url, name="test-decisions")
        try:
            js = nc.jetstream()
            await ensure_stream(js, stream_config(settings), Dependency.DECISION_LOG)
            answer = R.ScoreResponse(transaction_id="t-1", decision=R.DECISION_DECLINE, score=0.9)
            answer.versions.policy = "policy-x"
            pending = PendingDecision(
                transaction=R.Transaction(transaction_id="t-1", card_id="c", timestamp_ms=1),
                answer=answer,
                features=None,
                decided_at_ms=int(time.time() * 1000),
                method=decisions_pb2.DecisionRecord.METHOD_SCORE,
            )
            await js.publish(
                f"{settings.subject_prefix}.policy-x",
                encode_decision(pending),
                stream=settings.stream,
            )
        finally:
            await nc.close()

        async with asyncio.timeout(10):
            while True:
                report = service.last_report
                if report is not None and (report.decisions_held, report.outcomes_held) == (1, 1):
                    break
                service.refreshed.clear()
                await service.refreshed.wait()
