"""The gRPC floor server (``cascade loadtest --floor``): a real process on a loopback port that
answers Score and ScoreBatch like the orchestrator's front, and is metered under its own role."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cascade.v1 import scoring_pb2
from loadtests.cli import floor_process
from loadtests.client import ScoringClient
from loadtests.cpu import CpuMeter, role_of
from loadtests.report import FLOOR_NAME

pytestmark = pytest.mark.integration


def _request(transaction_id: str) -> scoring_pb2.ScoreRequest:
    return scoring_pb2.ScoreRequest(
        transaction=scoring_pb2.Transaction(transaction_id=transaction_id, card_id="c1")
    )


async def test_floor_answers_each_call_at_once_echoing_its_ids(tmp_path: Path) -> None:
    process, target = floor_process(tmp_path / "floor")
    async with process:
        async with ScoringClient(target) as client:
            await client.health_check()  # SERVING, as the stack's readiness probe needs
            reply = await client.send(_request("tx-1").SerializeToString(), timeout_s=5.0)
            assert reply.transaction_id == "tx-1"
            assert reply.decided_by == scoring_pb2.DECIDED_BY_STAGE1
            assert reply.decision == scoring_pb2.DECISION_APPROVE
            assert not reply.reasons
            ids = [f"b-{i}" for i in range(50)]
            batch = await client.score_batch(
                scoring_pb2.ScoreBatchRequest(transactions=[_request(i).transaction for i in ids]),
                timeout_s=5.0,
            )
            assert [r.transaction_id for r in batch.results] == ids
        pid = process.pid
        assert pid is not None
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert role_of([part.decode() for part in cmdline if part]) == FLOOR_NAME
        if CpuMeter.available():
            snapshot = CpuMeter(stack_root=os.getpid()).snapshot()
            assert FLOOR_NAME in snapshot.roles
