"""The label readers on a real NATS JetStream: the quality job (``cascade quality --serve`` and
``python -m cascade.quality_job``), which starts before either stream exists (no label reported
yet, or the job started before the orchestrator) and follows each from the refresh that first
finds it; and the outcome labels ``cascade rollout report --outcomes`` reads."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cascade.decision_record import PendingDecision, encode_decision
from cascade.errors import Dependency
from cascade.jetstream_streams import ensure_stream
from cascade.nats_connection import connect_nats
from cascade.outcome_record import VIA_GRPC
from cascade.outcome_store import OutcomeStore
from cascade.quality_job import QualityService, read_outcome_labels
from cascade.settings import DecisionLogSettings, OutcomeSettings
from cascade.v1 import decisions_pb2
from cascade.v1 import scoring_pb2 as R
from devstack.rollout_cli import add_arguments as add_rollout_arguments
from devstack.rollout_cli import run as run_rollout
from devstack.servers import NatsServer, free_port
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

        await publish_one_labelled_decision(nats.url)

        async with asyncio.timeout(10):
            while True:
                report = service.last_report
                if report is not None and (report.decisions_held, report.outcomes_held) == (1, 1):
                    break
                service.refreshed.clear()
                await service.refreshed.wait()


async def publish_one_labelled_decision(url: str) -> None:
    """A chargeback for ``t-1`` and its DECLINE decision under ``policy-x``, each stream created
    by its writer as the orchestrator would."""
    async with OutcomeStore(url, OutcomeSettings()) as outcomes:
        await outcomes.store(
            R.Outcome(transaction_id="t-1", label=R.OUTCOME_LABEL_CHARGEBACK),
            int(time.time() * 1000),
            VIA_GRPC,
        )
    settings = DecisionLogSettings()
    nc = await connect_nats(url, name="test-decisions")
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


async def test_the_job_process_serves_the_gauges_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    async with NatsServer(
        jetstream=True, store_dir=tmp_path / "js", log_dir=tmp_path / "nats"
    ) as nats:
        env = {
            **os.environ,
            "CASCADE_NATS__URL": nats.url,
            "CASCADE_METRICS_PORT": str(port),
            "CASCADE_QUALITY__REFRESH_S": "0.1",
            "CASCADE_QUALITY__WINDOWS_S": "[3600]",
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cascade.quality_job",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line.strip() == b"READY"
            await publish_one_labelled_decision(nats.url)
            async with asyncio.timeout(15):
                while True:  # another process's gauges: nothing to await but the next poll
                    if fraud_labelled(await asyncio.to_thread(_get, port)) == 1.0:
                        break
                    await asyncio.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0, err.decode()


def fraud_labelled(text: str) -> float | None:
    """``cascade_quality_fraud_labelled`` of ``policy-x`` in the 1h window, if exported."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "cascade_quality_fraud_labelled"
                and sample.labels.get("policy") == "policy-x"
                and sample.labels.get("window") == "1h"
            ):
                return float(sample.value)
    return None


def _get(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            return str(response.read().decode())
    except OSError:
        return ""


async def test_rollout_report_reads_its_labels_from_the_outcome_stream(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with NatsServer(
        jetstream=True, store_dir=tmp_path / "js", log_dir=tmp_path / "nats"
    ) as nats:
        assert await read_outcome_labels(nats.url) == {}  # no stream yet: no labels
        now_ms = int(time.time() * 1000)
        async with OutcomeStore(nats.url, OutcomeSettings()) as outcomes:
            for tx_id, label in (
                ("t-1", R.OUTCOME_LABEL_CHARGEBACK),
                ("t-2", R.OUTCOME_LABEL_GENUINE),
                ("t-3", R.OUTCOME_LABEL_GENUINE),
                ("t-3", R.OUTCOME_LABEL_CONFIRMED_FRAUD),  # fraud wins over genuine
            ):
                await outcomes.store(R.Outcome(transaction_id=tx_id, label=label), now_ms, VIA_GRPC)
        assert await read_outcome_labels(nats.url) == {"t-1": True, "t-2": False, "t-3": True}

        shadow = tmp_path / "shadow.jsonl"
        rows = [
            ("t-1", "DECLINE", "REVIEW"),
            ("t-2", "REVIEW", "APPROVE"),
            ("t-3", "APPROVE", "DECLINE"),
            ("t-4", "DECLINE", "DECLINE"),  # unlabelled: left out of quality
        ]
        shadow.write_text(
            "".join(
                json.dumps(
                    {
                        "transaction_id": t,
                        "champion_versions": "p/a/b/fs",
                        "candidate_versions": "p/c/b/fs",
                        "champion_decision": champ,
                        "candidate_decision": cand,
                        "champion_score": 0.5,
                        "candidate_score": 0.5,
                        "champion_stage1_score": 0.5,
                        "candidate_stage1_score": 0.5,
                        "champion_escalated": False,
                        "candidate_escalated": False,
                        "candidate_latency_us": 100.0,
                    }
                )
                + "\n"
                for t, champ, cand in rows
            )
        )
        parser = argparse.ArgumentParser()
        add_rollout_arguments(parser.add_subparsers(dest="command"))
        args = parser.parse_args(
            [
                "rollout",
                "report",
                "--shadow",
                str(shadow),
                "--outcomes",
                "--nats",
                nats.url,
                "--json",
            ]
        )
        assert await asyncio.to_thread(run_rollout, args) == 0
    report = json.loads(capsys.readouterr().out)
    champion, candidate = report["champion_quality"], report["candidate_quality"]
    assert (champion["labelled"], champion["frauds"]) == (3, 2)
    assert champion["flag_recall"] == 0.5  # t-1 flagged, t-3 approved
    assert champion["flag_precision"] == 0.5  # t-1 of t-1, t-2
    assert candidate["decline_recall"] == 0.5 and candidate["decline_precision"] == 1.0
