"""``cascade up`` as a user runs it: the whole stack as processes, sample traffic, clean exit."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from cascade.settings import DEFAULT_MODEL_DIR
from tests.integration.conftest import processes_mentioning

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
        "cascade.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


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


async def test_up_stops_everything_on_sigterm(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cascade.cli",
        "up",
        *FREE_PORTS,
        "--workers=1",
        "--orchestrators=2",
        f"--model-dir={DEFAULT_MODEL_DIR}",
        f"--run-dir={run_dir}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
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


def children_running(parent: int, module: str) -> list[int]:
    """Pids of ``python -m <module>`` processes whose parent is ``parent``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and cmdline[1:3] == [b"-m", module.encode()]:
            found.append(int(proc.name))
    return found


async def test_up_restarts_a_killed_orchestrator_process_prints_it_and_still_drains(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cascade.cli",
        "up",
        *FREE_PORTS,
        "--workers=1",
        "--orchestrators=2",
        f"--model-dir={DEFAULT_MODEL_DIR}",
        f"--run-dir={run_dir}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
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
    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(60):
        rest, _ = await proc.communicate()
    seen += rest.decode()
    assert proc.returncode == 0, seen
    assert re.search(r"restarts: orchestrator-\d 1\)", seen), seen
    assert processes_mentioning(run_dir) == set()
