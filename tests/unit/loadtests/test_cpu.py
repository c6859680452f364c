"""CPU accounting by component: roles from command lines, the report math, a real snapshot."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtests.cpu import (
    CpuMeter,
    CpuSnapshot,
    cpu_report,
    machine_times,
    process_cpu_s,
    role_of,
)
from loadtests.report import Goals, evaluate_goals


@pytest.mark.parametrize(
    ("cmdline", "role"),
    [
        (["/v/bin/python", "-m", "orchestrator"], "orchestrator"),
        (["/v/bin/python", "-m", "stages.screening"], "screening-workers"),
        (["/v/bin/python", "-m", "loadtests.naive", "server"], "naive-server"),
        (["/v/bin/python", "-m", "loadtests.naive", "worker"], "naive-workers"),
        (["/v/bin/python", "-m", "loadtests.grpc_floor"], "grpc-floor"),
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
        CpuSnapshot({"orchestrator": 10.0, "redis": 1.0, "loadgen": 3.0}),
        CpuSnapshot({"orchestrator": 11.0, "redis": 1.25, "nats": 0.25, "loadgen": 3.5}),
        wall_s=2.0,
        answers=1000,
    )
    assert report["cores"] == {
        "loadgen": 0.25,
        "nats": 0.125,
        "orchestrator": 0.5,
        "redis": 0.125,
        "stack": 0.75,
        "total": 1.0,
    }
    assert report["ms_per_answer"]["orchestrator"] == 1.0
    assert report["ms_per_answer"]["stack"] == 1.5  # the generator is not the stack
    assert report["ms_per_answer"]["total"] == 2.0


def test_cpu_report_counts_only_the_named_stack_roles_and_each_worker() -> None:
    before = CpuSnapshot(
        {"orchestrator": 1.0, "naive-server": 1.0, "screening-workers": 0.5},
        {"screening-workers": {"11": 0.2, "12": 0.3}},
    )
    after = CpuSnapshot(
        {"orchestrator": 1.6, "naive-server": 1.1, "screening-workers": 0.8},
        {"screening-workers": {"11": 0.3, "12": 0.5}},
    )
    report = cpu_report(before, after, 1.0, 1000, stack_roles=("orchestrator", "screening-workers"))
    assert report["ms_per_answer"]["stack"] == pytest.approx(0.9)  # not the idle naive server
    assert report["per_process_ms_per_answer"] == {
        "screening-workers": {"11": pytest.approx(0.1), "12": pytest.approx(0.2)}
    }


def test_cpu_report_gives_wake_ups_and_run_queue_wait_per_answer() -> None:
    before = CpuSnapshot(
        {"orchestrator": 1.0, "loadgen": 1.0},
        waits={"orchestrator": 2.0, "loadgen": 1.0},
        switches={"orchestrator": 10_000, "loadgen": 500},
    )
    after = CpuSnapshot(
        {"orchestrator": 2.0, "loadgen": 1.5},
        waits={"orchestrator": 2.3, "loadgen": 1.5, "nats": 9.0},
        switches={"orchestrator": 17_000, "loadgen": 2_500, "nats": 99},
    )
    sched = cpu_report(before, after, 1.0, 1000)["sched"]
    assert sched["switches_per_answer"] == {"orchestrator": 7.0, "loadgen": 2.0, "stack": 7.0}
    assert sched["rq_wait_ms_per_answer"]["orchestrator"] == pytest.approx(0.3)
    assert sched["rq_wait_ms_per_answer"]["stack"] == pytest.approx(0.3)  # not the generator
    # A role seen only after the step started (nats here) has no difference to report.
    assert "nats" not in sched["switches_per_answer"]
    assert "sched" not in cpu_report(CpuSnapshot(), after, 1.0, 1000)


def test_cpu_report_gives_what_the_host_stole() -> None:
    zero = dict.fromkeys(
        ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"), 0.0
    )
    later = zero | {"user": 1.0, "system": 0.3, "softirq": 0.1, "idle": 2.0, "steal": 0.6}
    machine = cpu_report(
        CpuSnapshot({"loadgen": 1.0}, machine=zero),
        CpuSnapshot({"loadgen": 1.1}, machine=later),
        wall_s=2.0,
        answers=300,
    )["machine"]
    assert machine == {
        "busy_cores": 0.7,  # user + system + softirq over 2 s; idle is not busy
        "steal_cores": 0.3,
        "steal_share": 0.3,  # 0.6 of the 2.0 s the cores wanted to run
        "steal_ms_per_answer": 2.0,
    }
    assert "machine" not in cpu_report(CpuSnapshot(), CpuSnapshot(machine=later), 2.0, 300)


def test_machine_times_reads_proc_stat_and_tolerates_what_is_not(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  500 0 100 9000 10 0 20 250 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    times = machine_times(stat)
    ticks = os.sysconf("SC_CLK_TCK")
    assert times["steal"] == 250 / ticks and times["user"] == 500 / ticks
    assert times["idle"] == 9000 / ticks
    stat.write_text("intr 1 2 3\n")
    assert machine_times(stat) == {}
    assert machine_times(tmp_path / "missing") == {}


def test_cpu_report_without_stack_processes_has_no_stack_figure() -> None:
    """Against a --target the meter does not own, it sees only the generator: a "stack" of 0 ms
    per answer once read as the whole-stack CPU goal met."""
    report = cpu_report(
        CpuSnapshot({"loadgen": 1.0}, waits={"loadgen": 1.0}, switches={"loadgen": 10}),
        CpuSnapshot({"loadgen": 1.3}, waits={"loadgen": 1.1}, switches={"loadgen": 310}),
        wall_s=1.0,
        answers=1000,
    )
    assert "stack" not in report["ms_per_answer"] and "stack" not in report["cores"]
    assert "stack" not in report["sched"]["switches_per_answer"]
    assert report["ms_per_answer"]["total"] == pytest.approx(0.3)
    step = {"mode": "open", "offered_rate": 300.0, "cpu": report}
    goals = {g["name"]: g for g in evaluate_goals({"steps": [step]}, None, Goals())}
    assert goals["stack_cpu_ms"]["measured"] is None and goals["stack_cpu_ms"]["met"] is None


def test_cpu_report_without_answers_or_time() -> None:
    report = cpu_report(CpuSnapshot(), CpuSnapshot({"x": 1.0}), wall_s=0.0, answers=0)
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
    assert after.roles["loadgen"] - before.roles["loadgen"] >= 0.35


@pytest.mark.skipif(not CpuMeter.available(), reason="needs /proc")
def test_process_cpu_counts_one_process() -> None:
    before = process_cpu_s(os.getpid())
    deadline = time.process_time() + 0.1
    while time.process_time() < deadline:
        pass
    assert process_cpu_s(os.getpid()) - before >= 0.08
    assert process_cpu_s(2**22 + 7) == 0.0  # no such process


@pytest.mark.skipif(not CpuMeter.available(), reason="needs /proc")
def test_snapshot_counts_this_process_wake_ups() -> None:
    meter = CpuMeter()
    before = meter.snapshot()
    if not before.switches:
        pytest.skip("this kernel keeps no schedstat")
    for _ in range(20):
        time.sleep(0.001)  # each sleep ends with the thread scheduled in again
    after = meter.snapshot()
    assert after.switches["loadgen"] - before.switches["loadgen"] >= 20
    assert after.waits["loadgen"] >= before.waits["loadgen"]


@pytest.mark.skipif(not CpuMeter.available(), reason="needs /proc")
def test_meters_split_two_stacks_by_subtree() -> None:
    # A child whose command line reads like a screening worker (python -c ignores the rest).
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)", "-m", "stages.screening"]
    )
    try:
        deadline = time.monotonic() + 10
        while "screening-workers" not in CpuMeter().snapshot().roles:
            assert time.monotonic() < deadline, "the child never showed up in /proc"
            time.sleep(0.05)
        mine = CpuMeter().snapshot()
        assert str(child.pid) in mine.processes["screening-workers"]
        assert "screening-workers" not in CpuMeter(skip={child.pid}).snapshot().roles
        theirs = CpuMeter(stack_root=child.pid).snapshot()
        assert set(theirs.processes["screening-workers"]) == {str(child.pid)}
        assert "loadgen" in theirs.roles  # the generator counts for every meter
    finally:
        child.kill()
        child.wait()
