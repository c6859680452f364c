"""``cascade loadtest`` end to end: its own local stack and the naive baseline, a tiny sweep from
two generator processes, a report whose numbers add up, and a SIGTERM that stops the stack."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from cascade.cpu_latency import CpuLatencyHold
from cascade.settings import DEFAULT_MODEL_DIR
from tests.integration.conftest import live_descendants, live_processes, processes_mentioning

pytestmark = pytest.mark.integration

STAGES = {
    "redis",
    "features",
    "stage1",
    "stage2",
    "server_total",
    "orchestrator",
    "transport",
    "front",
    "legs",
}
SUMMARY_KEYS = {"count", "mean", "p50", "p95", "p99", "p99_9", "max"}


async def start_cli(*args: str) -> asyncio.subprocess.Process:
    """``cascade loadtest`` with ``args``, stdout and stderr together on a pipe."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "devstack.cli",
        "loadtest",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def run_cli(*args: str, timeout_s: float = 400) -> tuple[int, str]:
    proc = await start_cli(*args)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def _check_step(step: dict[str, Any], *, count_cap: int | None = None) -> None:
    counts = step["counts"]
    assert counts["scheduled"] == counts["sent"] + counts["unsent"]
    assert counts["sent"] == counts["ok"] + counts["errors"] + counts["timeouts"]
    assert counts["ok"] == sum(counts["decided_by"].values())
    assert counts["cache_hits"] == counts["decided_by"].get("CACHE", 0)
    assert counts["within_budget"] <= counts["ok"]
    assert step["bookkeeping_problems"] == []
    assert step["latency_ms"]["count"] == counts["sent"]
    assert set(step["latency_ms"]) == SUMMARY_KEYS
    assert set(step["stages_ms"]) == STAGES
    assert step["stages_ms"]["server_total"]["count"] == counts["ok"]
    # Every answer says how much of its deadline was left at the handler (the naive server's
    # too), which splits its transport into the wait in the front and the rest.
    stages = step["stages_ms"]
    assert stages["front"]["count"] == stages["legs"]["count"] == counts["ok"]
    if counts["ok"]:
        # the front is part of transport (2 ms of slack: gRPC's timeout header and clocks)
        assert stages["front"]["p50"] <= stages["transport"]["p50"] + 2.0
    lat = step["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["p99_9"] <= lat["max"]
    assert set(step["rates"]) == {
        "slo_attainment",
        "error",
        "timeout",
        "fallback",
        "escalation",
        "cache_hit",
        "shed",
        "degraded_share",
    }
    assert all(0.0 <= v <= 1.0 for v in step["rates"].values())
    if count_cap is not None:
        assert counts["scheduled"] <= count_cap


@pytest.mark.skipif(
    not (DEFAULT_MODEL_DIR / "registry.json").exists(), reason="no committed models"
)
async def test_loadtest_sweeps_both_cascades_and_writes_a_consistent_report(
    tmp_path: Path,
) -> None:
    out_dir = tmp_path / "out"
    code, out = await run_cli(
        f"--model-dir={DEFAULT_MODEL_DIR}",
        f"--out={out_dir}",
        "--workers=1",
        "--processes=2",
        "--sweep",
        "--sweep-start=20",
        "--sweep-factor=2",
        "--sweep-max=40",
        "--duration=1.5",
        "--count=25",
        "--repeat-share=0.3",
        "--serial-count=40",
        "--warmup=0.5",
        # Lenient on purpose: this checks the machinery, not this busy machine's tail latency
        # (one naive call at 68 ms, 18 ms of it the generator's own lag, once ended its sweep).
        "--p99-target-ms=200",
        "--budget-ms=200",
    )
    assert code == 0, out
    assert "capacity at SLO: cascade" in out
    report = json.loads((out_dir / "report.json").read_text())
    assert set(report) == {"meta", "targets", "comparison", "comparison_with_ref", "goals"}
    assert report["meta"]["command"].startswith("cascade loadtest ")
    assert set(report["targets"]) == {"cascade", "naive"}
    for name, target in report["targets"].items():
        assert target["target"].startswith("127.0.0.1:")
        serial = target["serial"]
        _check_step(serial)
        assert serial["mode"] == "serial" and serial["counts"]["sent"] == 40
        assert serial["counts"]["ok"] == 40, (name, serial["counts"])
        rates = [s["offered_rate"] for s in target["steps"]]
        assert rates[:2] == [20.0, 40.0], rates
        for step in target["steps"]:
            _check_step(step, count_cap=25)
            assert step["processes"] == 2 and step["mode"] == "open"
            assert step["counts"]["ok"] > 0
        # A 30% repeat share at these rates brings cache hits (repeats of answered calls).
        assert sum(s["counts"]["cache_hits"] for s in target["steps"]) > 0
        if target["capacity"] is not None:
            assert target["capacity"]["rate"] in rates
    comparison = report["comparison"]
    assert set(comparison) >= {"capacity_rate", "serial_latency", "same_rate"}
    assert [row["rate"] for row in comparison["same_rate"]] == [20.0, 40.0]
    assert {g["name"] for g in report["goals"]} == {
        "serial_stage1_p50_ms",
        "serial_stage1_p99_ms",
        "serial_escalated_p99_ms",
        "capacity_rate",
        "capacity_ratio",
        "low_load_p99_ms",
        "orchestrator_p50_ms",
        "orchestrator_cpu_ms",
        "screening_cpu_ms",
        "stack_cpu_ms",
        "degraded_share_under_capacity",
        "overload_late",
        "overload_deadline_exceeded",
        "overload_unlabelled",
    }
    # What an idle core does here is recorded beside the figures (None where /sys hides it).
    assert set(report["meta"]["idle"]) == {
        "cpuidle_driver",
        "cpuidle_governor",
        "guest_halt_poll_ns",
    }
    for png in ("summary.png", "sweep.png"):
        assert (out_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert processes_mentioning(out_dir) == set()  # every server it started has stopped


@pytest.mark.skipif(
    not (DEFAULT_MODEL_DIR / "registry.json").exists(), reason="no committed models"
)
async def test_loadtest_backfills_mature_histories_and_reports_an_overload_step(
    tmp_path: Path,
) -> None:
    out_dir = tmp_path / "out"
    code, out = await run_cli(
        f"--model-dir={DEFAULT_MODEL_DIR}",
        f"--out={out_dir}",
        "--workers=2",
        "--no-baseline",
        "--history=mature",
        "--rate=30",
        "--duration=1",
        "--serial-count=20",
        "--warmup=0.3",
        "--overload-rate=150",
        "--overload-duration=1.5",
        "--p99-target-ms=50",
        timeout_s=120,
    )
    assert code == 0, out
    report = json.loads((out_dir / "report.json").read_text())
    history = report["meta"]["history"]
    assert history["mode"] == "mature"
    assert history["backfilled_transactions"] == 64 * history["backfilled_cards"] > 0
    assert history["backfill_batches"] * 500 >= history["backfilled_transactions"]
    target = report["targets"]["cascade"]
    backfill = target["history"]["backfill"]
    assert backfill["transactions"] == history["backfilled_transactions"]
    assert backfill["cards"] == history["backfilled_cards"]
    seen = target["history"]["seen_by_load"]
    assert seen["min"] == 64 and seen["full_share"] == 1.0
    assert seen["count"] >= target["steps"][0]["counts"]["sent"]
    overload = target["overload"]
    _check_step(overload)
    assert overload["mode"] == "overload" and overload["offered_rate"] == 150.0
    o = overload["summary"]
    c = overload["counts"]
    assert o["adds_up"] is True
    assert o["served"] + o["shed"] + o["deadline_exceeded"] + o["other_failures"] == o["sent"]
    assert o["sent"] == c["sent"] > 0 and o["answers"] == c["ok"]
    assert o["shed"] == c["reasons"].get("OVERLOADED", 0)
    assert o["late"] <= o["answers"] and o["late_after_ms"] == 52.0
    for step in [target["serial"], *target["steps"], overload]:
        cpu = step["cpu"]
        assert cpu["ms_per_answer"]["stack"] > 0
        assert cpu["ms_per_answer"]["total"] >= cpu["ms_per_answer"]["stack"]
        assert "loadgen" not in cpu["stack_roles"]
        workers = cpu["per_process_ms_per_answer"]["screening-workers"]
        assert len(workers) == 2
        assert sum(workers.values()) == pytest.approx(
            cpu["ms_per_answer"]["screening-workers"], abs=0.01
        )
    tables = (out_dir / "tables.md").read_text()
    assert "150 (overload)" in tables and "Overload step" in tables
    goals = {g["name"]: g for g in report["goals"]}
    assert goals["overload_deadline_exceeded"]["measured"] == o["deadline_exceeded"]
    assert processes_mentioning(out_dir) == set()


def _can_keep_cores_awake() -> bool:
    with CpuLatencyHold(0) as hold:
        return hold.held


@pytest.mark.skipif(
    not _can_keep_cores_awake(), reason="needs write access to /dev/cpu_dma_latency"
)
async def test_loadtest_runs_its_stack_beside_itself_with_the_cores_kept_awake(
    tmp_path: Path,
) -> None:
    out_dir = tmp_path / "out"
    code, out = await run_cli(
        f"--model-dir={DEFAULT_MODEL_DIR}",
        f"--out={out_dir}",
        "--workers=1",
        "--no-baseline",
        "--history=mature",
        "--rate=30",
        "--duration=1",
        "--serial-count=20",
        "--warmup=0.3",
        "--no-overload",
        "--p99-target-ms=50",
        "--compare-cpu-latency-us=0",
        timeout_s=150,
    )
    assert code == 0, out
    report = json.loads((out_dir / "report.json").read_text())
    targets = report["targets"]
    assert targets["cascade"]["target"] == targets["compare"]["target"]  # one stack, twice
    assert report["meta"]["compare"]["cpu_latency_us"] == 0
    for name, held in (("cascade", None), ("compare", 0)):
        target = targets[name]
        for step in [target["serial"], *target["steps"]]:
            _check_step(step)
            assert step.get("cpu_latency_us") == held, (name, step["label"])
            assert step["cpu"]["machine"]["steal_share"] is not None
            # its own transaction ids: only planned repeats can find the other side's answers
            assert step["counts"]["cache_hits"] <= step["counts"]["repeats_planned"]
    assert "cores kept awake" in (out_dir / "tables.md").read_text()
    assert processes_mentioning(out_dir) == set()


async def test_loadtest_refuses_a_target_that_is_not_loopback(tmp_path: Path) -> None:
    code, out = await run_cli("--target=10.1.2.3:50051", f"--out={tmp_path}", timeout_s=60)
    assert code == 2
    assert "not a loopback address" in out
    assert not (tmp_path / "report.json").exists()


@pytest.mark.skipif(
    not (DEFAULT_MODEL_DIR / "registry.json").exists(), reason="no committed models"
)
async def test_loadtest_stopped_by_sigterm_stops_the_stack_it_started(tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    proc = await start_cli(
        f"--model-dir={DEFAULT_MODEL_DIR}",
        f"--out={out_dir}",
        "--workers=1",
        "--no-baseline",
        "--history=mature",
        "--rate=5",
        "--duration=300",
        "--serial-count=0",
        "--no-overload",
    )
    assert proc.stdout is not None
    seen = ""
    stack: set[int] = set()
    try:
        async with asyncio.timeout(180):
            while "backfilling" not in seen:  # printed once the stack serves
                line = await proc.stdout.readline()
                assert line, seen
                seen += line.decode()
        await asyncio.sleep(1.0)
        stack = live_descendants(proc.pid)
        # Redis, NATS, Triton (and its stub), a worker and an orchestrator at least.
        assert len(stack) >= 6, stack
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            out, _ = await proc.communicate()
        left = stack & live_processes()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for pid in stack & live_processes():  # should this fail, nothing it started outlives it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, seen + out.decode()
    assert left == set()
    assert processes_mentioning(out_dir) == set()
    assert not (out_dir / "report.json").exists()
