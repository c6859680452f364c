"""``cascade up`` as a user runs it: the whole stack as processes, sample traffic, clean exit."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest

from cascade.settings import DEFAULT_MODEL_DIR
from cascade.v1 import scoring_pb2_grpc
from devstack.servers import free_port
from tests.integration.cascade.conftest import new_request
from tests.integration.conftest import process_table, processes_mentioning

pytestmark = pytest.mark.integration

FREE_PORTS = [
    "--port=0",
    "--redis-port=0",
    "--nats-port=0",
    "--triton-grpc-port=0",
    "--triton-http-port=0",
    "--triton-metrics-port=0",
]


async def run_cascade(*args: str, timeout_s: float = 180) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "devstack.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def start_up(*args: str) -> asyncio.subprocess.Process:
    """``cascade up`` with free ports and ``args``, its output on a pipe."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "devstack.cli",
        "up",
        *FREE_PORTS,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def test_up_scores_sample_traffic_and_stops_everything(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code, out = await run_cascade(
        "up",
        *FREE_PORTS,
        "--workers=2",
        "--orchestrators=2",
        f"--model-dir={DEFAULT_MODEL_DIR}",
        f"--run-dir={run_dir}",
        "--sample=12",
        "--exit-after-sample",
    )
    assert code == 0, out
    assert re.search(r"scoring endpoint\s+grpc://127\.0\.0\.1:\d+", out)
    rows = [line for line in out.splitlines() if line.startswith("tx-")]
    assert len(rows) == 12, out
    assert all(re.search(r"\b(APPROVE|REVIEW|DECLINE)\b", row) for row in rows)
    assert any(re.search(r"\b(STAGE1|STAGE2)\b", row) for row in rows)
    assert not any("error" in row for row in rows), out
    assert processes_mentioning(run_dir) == set()
    logs = {p.name for p in (run_dir / "logs").iterdir()}
    assert {
        "orchestrator-0.log",
        "orchestrator-1.log",
        "screening-worker-0.log",
        "screening-worker-1.log",
    } <= logs


async def test_up_cluster_scores_on_a_nats_cluster_and_a_redis_cluster(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code, out = await run_cascade(
        "up",
        *FREE_PORTS,
        "--cluster",
        "--workers=2",
        "--orchestrators=2",
        f"--run-dir={run_dir}",
        "--sample=6",
        "--no-history",
        "--exit-after-sample",
    )
    assert code == 0, out
    nats_line = re.search(r"nats (\S+)", out)
    redis_line = re.search(r"redis (\S+)", out)
    assert nats_line and redis_line, out
    assert len(nats_line.group(1).split(",")) == 3  # every node, to every service
    assert len(redis_line.group(1).split(",")) == 6  # 3 masters, 3 replicas
    rows = [line for line in out.splitlines() if line.startswith("tx-")]
    assert len(rows) == 6, out
    # Nothing unavailable: the orchestrators reached both clusters (the cache read included).
    assert not any("UNAVAILABLE" in row or "error" in row for row in rows), out
    assert processes_mentioning(run_dir) == set()
    logs = {p.name for p in (run_dir / "logs").iterdir()}
    assert sum(name.startswith("nats-") for name in logs) == 3
    assert sum(name.startswith("redis-") for name in logs) == 6


async def test_up_stops_everything_on_sigterm(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = await start_up(
        "--workers=1",
        "--orchestrators=2",
        f"--model-dir={DEFAULT_MODEL_DIR}",
        f"--run-dir={run_dir}",
    )
    assert proc.stdout is not None
    seen = ""
    async with asyncio.timeout(180):
        while "running;" not in seen:
            line = await proc.stdout.readline()
            assert line, seen
            seen += line.decode()
    assert len(processes_mentioning(run_dir)) >= 1  # Triton is up, its repository under run_dir
    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(60):
        await proc.communicate()
    assert proc.returncode == 0
    assert processes_mentioning(run_dir) == set()
    for i in range(2):  # every orchestrator process served, then drained on the SIGTERM
        log = (run_dir / "logs" / f"orchestrator-{i}.log").read_text()
        assert "\nSERVING\n" in log and "stop requested: draining" in log, log


async def test_up_with_traces_stores_a_waterfall_of_every_hop(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code, out = await run_cascade(
        "up",
        *FREE_PORTS,
        "--workers=1",
        "--orchestrators=1",
        f"--model-dir={DEFAULT_MODEL_DIR}",
        f"--run-dir={run_dir}",
        "--sample=3",
        "--exit-after-sample",
        "--traces",
    )
    assert code == 0, out
    rows = [line for line in out.splitlines() if line.startswith("tx-")]
    escalated = [row for row in rows if " STAGE2 " in row]
    assert escalated, out  # seed 7's third sample escalates
    (trace_id,) = re.findall(r"\b[0-9a-f]{32}\b", escalated[0])
    code, waterfall = await run_cascade("trace", trace_id, f"--run-dir={run_dir}")
    assert code == 0, waterfall
    lines = waterfall.splitlines()
    assert lines[0].startswith(f"trace {trace_id}: ")
    spans = {(line.split()[2], line.split()[3]) for line in lines[2:]}
    assert {
        ("cascade-orchestrator", "cascade.Score"),
        ("cascade-orchestrator", "redis.lookup"),
        ("cascade-orchestrator", "stage1.screen"),
        ("cascade-screening-worker", "screening.score"),
        ("cascade-orchestrator", "stage2.infer"),
        ("triton", "InferRequest"),
    } <= spans, waterfall
    # Triton's spans continue the orchestrator's traceparent: InferRequest nests under
    # stage2.infer, and the Score span names the decision and versions.
    infer = next(line for line in lines if "stage2.infer" in line)
    request = next(line for line in lines if "InferRequest" in line)
    assert request.index("InferRequest") > infer.index("stage2.infer")
    assert "decision=" in lines[2] and "versions=policy-" in lines[2]
    code, missing = await run_cascade("trace", "0" * 31 + "1", f"--run-dir={run_dir}")
    assert code == 1 and "no spans of trace" in missing


async def test_up_refuses_a_taken_port_in_one_line_before_starting_anything(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = [a for a in FREE_PORTS if not a.startswith("--port=")]
        code, out = await run_cascade(
            "up", f"--port={port}", *args, f"--run-dir={tmp_path}", timeout_s=30
        )
    assert code == 2
    assert (
        out.strip()
        == f"cascade up: port {port} is in use; choose another with --port (0 picks a free one)"
    )
    assert not (tmp_path / "logs").exists()  # nothing was started


async def test_up_refuses_a_bad_setting_naming_it(tmp_path: Path) -> None:
    code, out = await run_cascade(
        "up", *FREE_PORTS, "--set", "CASCADE_BUDGET__SLO_MS=-5", timeout_s=30
    )
    assert code == 2
    assert (
        out.startswith("cascade up: CASCADE_BUDGET__SLO_MS: ")
        and len(out.strip().splitlines()) == 1
    )


async def test_up_passes_env_file_and_set_settings_to_the_services(tmp_path: Path) -> None:
    metrics_port = free_port()
    env_file = tmp_path / "stack.env"
    env_file.write_text(
        f"# for this test\nCASCADE_METRICS_PORT={metrics_port}\nCASCADE_BUDGET__SLO_MS=30\n"
    )
    proc = await start_up(
        "--workers=1",
        "--orchestrators=1",
        f"--run-dir={tmp_path / 'run'}",
        f"--env-file={env_file}",
        "--set",
        "CASCADE_BUDGET__RESPONSE_MARGIN_MS=4",
    )
    assert proc.stdout is not None
    try:
        target = ""
        seen: list[str] = []
        async with asyncio.timeout(180):
            while not (line := (await proc.stdout.readline()).decode()).startswith("running;"):
                if not line:  # say how, for a failure seen once in CI with no output at all
                    code = await asyncio.wait_for(proc.wait(), 10)
                    pytest.fail(f"cascade up exited early (status {code}): {''.join(seen)!r}")
                seen.append(line)
                if found := re.search(r"grpc://(127\.0\.0\.1:\d+)", line):
                    target = found.group(1)
        async with grpc.aio.insecure_channel(target) as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            reply = await stub.Score(new_request(), timeout=1.0)
        # The budget is min(deadline, SLO) - margin: 30 ms and 4 ms from the file and --set.
        assert reply.timings.budget_us == 26_000
        # Sent with 1 s, which gRPC's timeout header rounds up to its next 10 ms: the handler
        # started with about that left.
        assert 900_000 < reply.timings.deadline_left_us <= 1_010_000
        metrics = await asyncio.to_thread(
            lambda: urllib.request.urlopen(
                f"http://127.0.0.1:{metrics_port}/metrics", timeout=2
            ).read()
        )
        assert b"cascade_scores_total" in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 60)
    assert proc.returncode == 0


def children_running(parent: int, module: str) -> list[int]:
    """Pids of ``python -m <module>`` processes whose parent is ``parent``."""
    found = []
    for pid, _state, ppid, _pgrp in process_table():
        if ppid != parent:
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline[1:3] == [b"-m", module.encode()]:
            found.append(pid)
    return found


async def test_up_restarts_a_killed_orchestrator_process_prints_it_and_still_drains(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    proc = await start_up(
        "--workers=1",
        "--orchestrators=2",
        f"--model-dir={DEFAULT_MODEL_DIR}",
        f"--run-dir={run_dir}",
        "--supervisor-metrics-port=0",
    )
    assert proc.stdout is not None
    seen = ""

    async def read_until(needle: str) -> None:
        nonlocal seen
        while not re.search(needle, seen):
            line = await proc.stdout.readline()  # type: ignore[union-attr]
            assert line, seen
            seen += line.decode()

    async with asyncio.timeout(180):
        await read_until("running;")
    orchestrators = children_running(proc.pid, "orchestrator")
    assert len(orchestrators) == 2
    os.kill(orchestrators[0], signal.SIGKILL)  # shares the reuse-port socket with the other
    async with asyncio.timeout(90):
        await read_until(r"orchestrator-\d exited with status -9: restart #1 after [\d.]+ s, back")
    assert len(children_running(proc.pid, "orchestrator")) == 2
    # The restart counter is a metric too.
    metrics_url = re.search(r"supervisor metrics on (http://127\.0\.0\.1:\d+/metrics)", seen)
    assert metrics_url, seen
    url = metrics_url.group(1)
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=2).read().decode())
    assert re.search(r'cascade_stack_restarts_total\{child="orchestrator-\d"\} 1\.0', text), text
    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(60):
        rest, _ = await proc.communicate()
    seen += rest.decode()
    assert proc.returncode == 0, seen
    assert re.search(r"restarts: orchestrator-\d 1\)", seen), seen
    assert processes_mentioning(run_dir) == set()
