"""CPU accounting by component: roles from command lines, the report math, a real snapshot."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from loadtests.cpu import CpuMeter, cpu_report, role_of


@pytest.mark.parametrize(
    ("cmdline", "role"),
    [
        (["/v/bin/python", "-m", "orchestrator"], "orchestrator"),
        (["/v/bin/python", "-m", "stages.screening"], "screening-workers"),
        (["/v/bin/python", "-m", "loadtests.naive", "server"], "naive-server"),
        (["/v/bin/python", "-m", "loadtests.naive", "worker"], "naive-workers"),
        (["/x/redis-server", "127.0.0.1:6379"], "redis"),
        (["/x/nats-server", "-p", "4222"], "nats"),
        (["/x/bin/tritonserver", "--model-repository=r"], "triton"),
        (["/x/triton_python_backend_stub", "m"], "triton"),
        (["/v/bin/python", "-c", "from multiprocessing.spawn import spawn_main"], "loadgen"),
        (["sleep", "1"], "other"),
    ],
)
def test_role_of(cmdline: list[str], role: str) -> None:
    assert role_of(cmdline) == role


def test_cpu_report_gives_cores_and_ms_per_answer() -> None:
    report = cpu_report(
        {"orchestrator": 10.0, "redis": 1.0},
        {"orchestrator": 11.0, "redis": 1.25, "nats": 0.25},
        wall_s=2.0,
        answers=1000,
    )
    assert report["cores"] == {"nats": 0.125, "orchestrator": 0.5, "redis": 0.125, "total": 0.75}
    assert report["ms_per_answer"]["orchestrator"] == 1.0
    assert report["ms_per_answer"]["total"] == 1.5


def test_cpu_report_without_answers_or_time() -> None:
    report = cpu_report({}, {"x": 1.0}, wall_s=0.0, answers=0)
    assert report["cores"]["x"] == 0.0 and report["ms_per_answer"]["x"] == 0.0


@pytest.mark.skipif(not CpuMeter.available(), reason="needs /proc")
def test_snapshot_counts_this_process_and_its_children() -> None:
    meter = CpuMeter()
    before = meter.snapshot()
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        pass
    # A child that burns CPU and is reaped counts for the generator too (cutime).
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import time\nt=time.process_time()+0.2\nwhile time.process_time()<t: pass",
        ],
        check=True,
    )
    after = meter.snapshot()
    assert after["loadgen"] - before["loadgen"] >= 0.35
