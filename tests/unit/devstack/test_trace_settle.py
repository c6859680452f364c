"""`cascade up --sample --traces` waits for the sample's spans, Triton's of escalated calls too,
instead of a fixed pause (which lost Triton's span on a busy machine)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from devstack.cli import _sample_services
from devstack.otlp_receiver import SPANS_FILE, wait_for_services
from devstack.trace_view import SpanRecord

ESCALATED = "a" * 32
SCREENED = "b" * 32


def _span(trace_id: str, service: str) -> str:
    return SpanRecord(trace_id, "1" * 16, "", service, "x", 0, 1).to_json() + "\n"


def test_escalated_rows_want_tritons_span_and_every_row_the_orchestrators() -> None:
    lines = [
        "transaction  card  amount  decision ...",  # the header has no trace
        f"tx-1  card-1  658.09 EUR DECLINE  0.99 STAGE2  yes  6.8  {ESCALATED} account_takeover",
        f"tx-2  card-2   63.19 CAD APPROVE  0.00 STAGE1       6.9  {SCREENED} -",
    ]
    assert _sample_services(lines) == {
        ESCALATED: {"cascade-orchestrator", "triton"},
        SCREENED: {"cascade-orchestrator"},
    }


async def test_waits_for_a_late_span_and_gives_up_at_its_limit(tmp_path: Path) -> None:
    wanted = {ESCALATED: {"cascade-orchestrator", "triton"}}
    spans = tmp_path / SPANS_FILE
    spans.write_text(_span(ESCALATED, "cascade-orchestrator"))
    assert not await wait_for_services(tmp_path, wanted, at_least_s=0.0, at_most_s=0.3)

    async def triton_exports_late() -> None:
        await asyncio.sleep(0.3)
        with spans.open("a") as fh:
            fh.write(_span(ESCALATED, "triton"))

    late = asyncio.create_task(triton_exports_late())
    assert await wait_for_services(tmp_path, wanted, at_least_s=0.0, at_most_s=10.0)
    await late
