"""The idle-penalty benchmark: the machine's idle settings, the row math, and a real short run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtests.cpu import describe_idle, idle_settings
from loadtests.idle_penalty import main, measure, summarize
from loadtests.tables import markdown_tables, text_table


def _sys_root(tmp_path: Path, poll_ns: str | None) -> Path:
    cpuidle = tmp_path / "devices/system/cpu/cpuidle"
    cpuidle.mkdir(parents=True)
    (cpuidle / "current_driver").write_text("haltpoll\n")
    (cpuidle / "current_governor_ro").write_text("haltpoll\n")
    if poll_ns is not None:
        params = tmp_path / "module/haltpoll/parameters"
        params.mkdir(parents=True)
        (params / "guest_halt_poll_ns").write_text(poll_ns + "\n")
    return tmp_path


def test_idle_settings_are_read_from_sys_and_none_where_not_exposed(tmp_path: Path) -> None:
    assert idle_settings(_sys_root(tmp_path / "a", "0")) == {
        "cpuidle_driver": "haltpoll",
        "cpuidle_governor": "haltpoll",
        "guest_halt_poll_ns": "0",
    }
    assert idle_settings(_sys_root(tmp_path / "b", None))["guest_halt_poll_ns"] is None
    assert set(idle_settings(tmp_path / "empty").values()) == {None}


def test_the_description_says_when_an_idle_core_halts_at_once() -> None:
    halting = describe_idle({"cpuidle_driver": "haltpoll", "guest_halt_poll_ns": "0"})
    assert "guest halt polling 0 ns" in halting and "halts at once" in halting
    polling = describe_idle({"cpuidle_driver": "haltpoll", "guest_halt_poll_ns": "200000"})
    assert "200000 ns" in polling and "halts at once" not in polling
    assert describe_idle({"cpuidle_driver": None}) == "cpuidle driver unknown"


def test_a_row_gives_median_p90_cpu_and_the_ratio_to_back_to_back() -> None:
    walls = [i / 1e6 for i in range(1, 11)]  # 1..10 us
    row = summarize("w", 3.0, walls, [2e-6] * 10, base_us=2.75)
    assert (row.runs, row.wall_p50_us, row.wall_p90_us, row.cpu_mean_us) == (10, 5.5, 10.0, 2.0)
    assert row.ratio_to_back_to_back == 2.0
    assert summarize("w", 0.0, walls, [0.0] * 10, base_us=0.0).ratio_to_back_to_back == 1.0
    with pytest.raises(ValueError, match="one wall and one CPU time per run"):
        summarize("w", 0.0, walls, [0.0], base_us=0.0)


def test_measure_sleeps_each_gap_before_every_timed_run() -> None:
    calls: list[float] = []
    rows = measure("count", lambda: calls.append(0.0), [0.0, 2.0], runs=4, warmup=1)
    assert [r.gap_ms for r in rows] == [0.0, 2.0] and len(calls) == 10
    assert rows[0].ratio_to_back_to_back == 1.0 and all(r.runs == 4 for r in rows)


def test_a_short_real_run_times_both_workloads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "idle.json"
    assert main(["--runs", "5", "--warmup", "2", "--gaps-ms", "0", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("machine idle: ") and "| screening model | 1 | 5 |" in printed
    payload = json.loads(out.read_text())
    rows = payload["results"]
    assert [(r["workload"], r["gap_ms"]) for r in rows] == [
        ("screening model", 0.0),
        ("screening model", 1.0),
        ("stage-1 features", 0.0),
        ("stage-1 features", 1.0),
    ]
    assert all(r["wall_p50_us"] > 0 and r["cpu_mean_us"] > 0 for r in rows)
    assert set(payload["idle"]) == {"cpuidle_driver", "cpuidle_governor", "guest_halt_poll_ns"}


def test_the_load_report_names_the_machines_idle_settings() -> None:
    report = {
        "meta": {"idle": {"cpuidle_driver": "haltpoll", "guest_halt_poll_ns": "0"}},
        "targets": {},
    }
    assert "machine idle: cpuidle driver haltpoll, guest halt polling 0 ns" in text_table(report)
    assert "- machine idle: cpuidle driver haltpoll" in markdown_tables(report)
    assert "machine idle" not in text_table({"targets": {}})
