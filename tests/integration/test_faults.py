"""``python -m loadtests.faults`` end to end, shortened: the stack, two phases (~10 s of load),
the JSON and the table."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import processes_mentioning

pytestmark = pytest.mark.integration


async def test_two_phases_of_the_fault_matrix_write_json_and_a_table(tmp_path: Path) -> None:
    out = tmp_path / "faults"
    argv = [
        "--phases=baseline,sigstop-one-worker",
        "--rate=50",
        "--pre=1",
        "--fault=2",
        "--post=2",
        f"--out={out}",
    ]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loadtests.faults",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    output, _ = await asyncio.wait_for(proc.communicate(), 240)
    text = output.decode()
    assert proc.returncode == 0, text

    report = json.loads((out / "faults.json").read_text())
    baseline, stopped = report["phases"]
    assert [baseline["phase"], stopped["phase"]] == ["baseline", "sigstop-one-worker"]
    for phase in report["phases"]:
        assert phase["bookkeeping_problems"] == []
        assert phase["sent"] > 100  # ~50/s for 5 s
        failed = phase["deadline_exceeded"] + phase["other_errors"]
        assert phase["answered"] + failed == phase["sent"]
    assert baseline["recovery_s"] is None and baseline["fault_at_s"] is None
    assert stopped["fault_end_s"] - stopped["fault_at_s"] == pytest.approx(2.0, abs=0.2)
    assert stopped["recovery_s"] is not None and stopped["recovery_s"] < 1.0
    assert report["meta"]["command"] == "python -m loadtests.faults " + " ".join(argv)

    table = (out / "faults.md").read_text()
    assert table.startswith("`python -m loadtests.faults")
    assert sum(line.startswith("| baseline |") for line in table.splitlines()) == 1
    assert "| sigstop-one-worker |" in text
    assert processes_mentioning(out) == set(), "the stack stopped with the script"
