"""The PM QoS hold: what it writes, that it lets go, and what it says when it cannot."""

from __future__ import annotations

import argparse
import os
import struct
from pathlib import Path

import pytest

from cascade.cpu_latency import CpuLatencyHold
from devstack.cli import main as cascade_main
from loadtests.cli import add_arguments, run


def test_the_hold_writes_the_latency_and_keeps_the_file_open_until_it_ends(
    tmp_path: Path,
) -> None:
    device = tmp_path / "cpu_dma_latency"
    device.write_bytes(b"")
    opened_before = len(os.listdir("/proc/self/fd"))
    with CpuLatencyHold(7, device) as hold:
        assert hold.held and hold.problem == ""
        assert device.read_bytes() == struct.pack(
            "=i", 7
        )  # a native 32-bit int, as the kernel reads
        assert len(os.listdir("/proc/self/fd")) == opened_before + 1
    assert not hold.held
    assert len(os.listdir("/proc/self/fd")) == opened_before  # closing it withdraws the request


def test_a_hold_that_cannot_take_says_why_and_changes_nothing(tmp_path: Path) -> None:
    with CpuLatencyHold(0, tmp_path / "missing" / "cpu_dma_latency") as hold:
        assert not hold.held
        assert "cannot open" in hold.problem and "missing" in hold.problem


@pytest.mark.parametrize("max_us", [-1, 2**31])
def test_a_latency_out_of_range_is_refused(max_us: int) -> None:
    with pytest.raises(ValueError, match="max_us"):
        CpuLatencyHold(max_us)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--compare-cpu-latency-us", "0", "--cpu-latency-us", "0"],
            "compares this stack with itself",
        ),
        (["--compare-cpu-latency-us", "0", "--compare-ref", "HEAD"], "not with"),
    ],
)
def test_loadtest_refuses_holds_that_contradict_each_other(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(_args(*argv, "--out", str(tmp_path))) == 2
    assert message in capsys.readouterr().err


def test_loadtest_refuses_a_hold_it_cannot_take_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cascade.cpu_latency.CPU_DMA_LATENCY", tmp_path / "none")
    assert run(_args("--compare-cpu-latency-us", "0", "--out", str(tmp_path / "o"))) == 2
    err = capsys.readouterr().err
    assert "--compare-cpu-latency-us: cannot open" in err
    assert not (tmp_path / "o" / "report.json").exists()
    with pytest.raises(SystemExit):
        _args("--cpu-latency-us", "-1")


def test_cascade_up_refuses_a_hold_it_cannot_take_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cascade.cpu_latency.CPU_DMA_LATENCY", tmp_path / "none")
    run_dir = tmp_path / "run"
    assert cascade_main(["up", "--cpu-latency-us", "0", "--run-dir", str(run_dir)]) == 2
    assert "--cpu-latency-us: cannot open" in capsys.readouterr().err
    assert not (run_dir / "logs").exists()  # no server was started
