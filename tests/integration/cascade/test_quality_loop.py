"""The label loop on real NATS JetStream with the cascade as processes: a simulated stream
scored, its outcomes reported through ``ReportOutcome`` and ``cascade outcomes import``, and
``cascade quality --format json`` agreeing with precision and recall computed directly from the
answers and the known labels; ``ReportOutcome``'s validation; ``cascade quality --serve``'s
gauges."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import urllib.request
from pathlib import Path
from typing import Any, Final

import grpc
import pytest

from cascade.model_registry import load_registry
from cascade.settings import DEFAULT_MODEL_DIR
from cascade.v1 import scoring_pb2 as R
from cascade.v1 import scoring_pb2_grpc
from cascade.wire import to_wire
from devstack.decisions import read_decision_rows
from devstack.servers import NatsServer, RedisServer, TritonServer, free_port
from tests.integration.cascade.conftest import cascade_processes
from training.labels import simulate_outcomes, write_outcome_csv
from training.simulator import SimulationConfig, simulate, write_stream

pytestmark = pytest.mark.integration

_BATCH: Final = 500
_LABELS: Final = {
    "confirmed_fraud": R.OUTCOME_LABEL_CONFIRMED_FRAUD,
    "chargeback": R.OUTCOME_LABEL_CHARGEBACK,
    "genuine": R.OUTCOME_LABEL_GENUINE,
}


async def run_cascade(*args: str, timeout_s: float = 120) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "devstack.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode == 0, err.decode()
    return proc.returncode, out.decode()


def expected(
    answers: dict[str, R.ScoreResponse], fraud: set[str]
) -> dict[str, tuple[float | None, float | None]]:
    """Precision and recall at DECLINE and REVIEW, unlabelled counted genuine."""
    out = {}
    for name, flagged_by in (
        ("decline", {R.DECISION_DECLINE}),
        ("review", {R.DECISION_DECLINE, R.DECISION_REVIEW}),
    ):
        flagged = {t for t, a in answers.items() if a.decision in flagged_by}
        tp = len(flagged & fraud)
        out[name] = (
            tp / len(flagged) if flagged else None,
            tp / len(fraud) if fraud else None,
        )
    return out


async def test_outcomes_reported_both_ways_give_the_known_precision_and_recall(
    tmp_path: Path, model_dir: Path, redis_server: RedisServer, heavy_triton: TritonServer
) -> None:
    records = simulate(SimulationConfig(seed=21, n_cards=120, n_days=21))
    outcomes = list(simulate_outcomes(records, seed=5))
    async with (
        NatsServer(jetstream=True, store_dir=tmp_path / "js", log_dir=tmp_path / "nats") as nats,
        cascade_processes(
            model_dir,
            tmp_path / "logs",
            redis_url=redis_server.url,
            nats_url=nats.url,
            triton_url=heavy_triton.grpc_url,
        ) as (stub, _, _),
    ):
        answers: dict[str, R.ScoreResponse] = {}
        for start in range(0, len(records), _BATCH):
            chunk = [to_wire(r.tx) for r in records[start : start + _BATCH]]
            reply = await stub.ScoreBatch(R.ScoreBatchRequest(transactions=chunk), timeout=120)
            answers.update((a.transaction_id, a) for a in reply.results)
        assert len(answers) == len(records)

        # Half of the labels through the API (one sent twice: stored once), half from a file.
        half = len(outcomes) // 2
        for o in outcomes[:half]:
            reply = await stub.ReportOutcome(
                R.ReportOutcomeRequest(
                    outcome=R.Outcome(
                        transaction_id=o.transaction_id,
                        label=_LABELS[o.label],
                        reported_at_ms=o.reported_at_ms,
                    )
                ),
                timeout=5,
            )
            assert reply.transaction_id == o.transaction_id and not reply.duplicate
        first = outcomes[0]
        again = await stub.ReportOutcome(
            R.ReportOutcomeRequest(
                outcome=R.Outcome(transaction_id=first.transaction_id, label=_LABELS[first.label])
            ),
            timeout=5,
        )
        assert again.duplicate
        csv_path = tmp_path / "outcomes.csv"
        write_outcome_csv(csv_path, outcomes[half:])
        _, out = await run_cascade("outcomes", "import", str(csv_path), "--nats", nats.url)
        assert f"stored {len(outcomes) - half} outcomes (0 already stored)" in out
        _, out = await run_cascade("outcomes", "import", str(csv_path), "--nats", nats.url)
        assert f"stored 0 outcomes ({len(outcomes) - half} already stored)" in out

        _, out = await run_cascade(
            "quality", "--format", "json", "--nats", nats.url, "--model-dir", str(model_dir)
        )
        report: dict[str, Any] = json.loads(out)

    fraud = {o.transaction_id for o in outcomes if o.label != "genuine"}
    assert fraud, "the simulated stream should hold labelled fraud"
    want = expected(answers, fraud)
    assert want["review"][0] is not None and want["review"][1], "something fraud was flagged"
    assert [w["window"] for w in report["windows"]] == ["1h", "1d", "7d"]
    for window in report["windows"]:
        (q,) = window["versions"]
        assert q["versions"]["policy"] == "policy-escalate-all"
        assert q["decisions"] == len(records)
        assert q["labelled"] == len({o.transaction_id for o in outcomes})
        assert q["fraud"] == len(fraud)
        for name in ("decline", "review"):
            precision, recall = want[name]
            assert q[name]["precision"] == pytest.approx(precision)
            assert q[name]["recall"] == pytest.approx(recall)
        assert q["stage2_scored"] == sum(
            a.decided_by == R.DECIDED_BY_STAGE2 for a in answers.values()
        )
        assert 0 < q["stage1_pr_auc"] <= 1
        assert q["label_delay_s"]["count"] == q["labelled"]
        if q["drift"] is not None:  # the committed stage 1's reference, when present
            assert q["drift"]["score_psi"] >= 0


_BAD_OUTCOMES: Final = [
    (R.Outcome(label=R.OUTCOME_LABEL_GENUINE), "outcome.transaction_id"),
    (R.Outcome(transaction_id="tx 1", label=R.OUTCOME_LABEL_GENUINE), "outcome.transaction_id"),
    (R.Outcome(transaction_id="tx-1"), "outcome.label"),
    (
        R.Outcome(transaction_id="tx-1", label=R.OUTCOME_LABEL_GENUINE, reported_at_ms=5),
        "outcome.reported_at_ms",
    ),
    (
        R.Outcome(transaction_id="tx-1", label=R.OUTCOME_LABEL_GENUINE, source="a b"),
        "outcome.source",
    ),
]


async def test_report_outcome_refuses_bad_input_naming_the_field_and_serves_gauges(
    quality_cascade: tuple[scoring_pb2_grpc.ScoringServiceStub, int],
    quality_nats: NatsServer,
    tmp_path: Path,
) -> None:
    stub, port = quality_cascade
    for outcome, field in _BAD_OUTCOMES:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ReportOutcome(R.ReportOutcomeRequest(outcome=outcome), timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in (caught.value.details() or "")
    await check_quality_serve(stub, quality_nats, f"127.0.0.1:{port}", tmp_path)


async def check_quality_serve(
    quality_cascade: scoring_pb2_grpc.ScoringServiceStub,
    quality_nats: NatsServer,
    target_addr: str,
    tmp_path: Path,
) -> None:
    """Score a stream with ``cascade outcomes score-stream``, label one answer fraud, and read
    ``cascade quality --serve``'s gauges."""
    stream = tmp_path / "sim.jsonl.gz"
    write_stream(stream, simulate(SimulationConfig(seed=22, n_cards=20, n_days=21))[:200])
    _, out = await run_cascade("outcomes", "score-stream", str(stream), "--target", target_addr)
    assert "scored 200 transactions" in out
    async with asyncio.timeout(10):
        while True:
            rows = [r async for r in read_decision_rows(quality_nats.url)]
            if len(rows) >= 200:
                break
            await asyncio.sleep(0.1)  # the decision log publishes after answering
    target = next((r for r in rows if r["decision"] in ("DECLINE", "REVIEW")), rows[0])
    recall = "1.0" if target["decision"] in ("DECLINE", "REVIEW") else "0.0"
    await quality_cascade.ReportOutcome(
        R.ReportOutcomeRequest(
            outcome=R.Outcome(
                transaction_id=str(target["transaction_id"]), label=R.OUTCOME_LABEL_CHARGEBACK
            )
        ),
        timeout=5,
    )
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "devstack.cli",
        "quality",
        "--serve",
        "--nats",
        quality_nats.url,
        "--metrics-port",
        str(port),
        "--refresh-s",
        "0.2",
        "--windows",
        "1h",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        text = ""
        async with asyncio.timeout(30):
            while "cascade_quality_recall{" not in text:
                await asyncio.sleep(0.2)  # another process's gauges: no event to await
                try:
                    text = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
                except OSError:
                    continue
        # The exposition lists labels sorted by name.
        committed = load_registry(DEFAULT_MODEL_DIR)
        versions = (
            f'policy="policy-escalate-all",stage1="{committed.stage1.version}",'
            f'stage2="{committed.stage2.version}"'
        )
        assert f'cascade_quality_fraud_labelled{{{versions},window="1h"}} 1.0' in text
        # The one fraud of the window: caught at REVIEW when its answer flagged it.
        assert (
            f'cascade_quality_recall{{{versions},threshold="REVIEW",window="1h"}} {recall}' in text
        )
        assert f'cascade_drift_psi{{{versions},variable="stage1_score",window="1h"}}' in text
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
    assert proc.returncode == 0


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as response:
        return str(response.read().decode())


@pytest.fixture
async def quality_nats(tmp_path: Path) -> Any:
    async with NatsServer(
        jetstream=True, store_dir=tmp_path / "js", log_dir=tmp_path / "nats"
    ) as nats:
        yield nats


@pytest.fixture
async def quality_cascade(
    tmp_path: Path,
    model_dir: Path,
    redis_server: RedisServer,
    heavy_triton: TritonServer,
    quality_nats: NatsServer,
) -> Any:
    port = free_port()
    async with cascade_processes(
        model_dir,
        tmp_path / "logs",
        redis_url=redis_server.url,
        nats_url=quality_nats.url,
        triton_url=heavy_triton.grpc_url,
        port=port,
    ) as (stub, _, _):
        yield stub, port
