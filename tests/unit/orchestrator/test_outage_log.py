"""OutageLog: one line when a dependency starts failing, one when it answers again."""

from __future__ import annotations

import logging

import pytest

from orchestrator.outage_log import OutageLog


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "orchestrator.outage_log"]


def test_an_outage_logs_its_start_and_its_end_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    log = OutageLog("stage 2 (Triton)")
    log.answered()
    for _ in range(3):
        log.failed(ConnectionError("refused"))
    log.answered()
    log.answered()
    got = lines(caplog)
    assert len(got) == 2
    assert got[0] == "stage 2 (Triton) failing: refused (answers are labelled)"
    assert got[1].startswith("stage 2 (Triton) answers again after ")
    assert got[1].endswith("(3 failed calls)")


def test_a_flapping_dependency_logs_at_most_one_start_per_quiet_period(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    log = OutageLog("Redis", quiet_s=3600.0)
    for _ in range(5):
        log.failed(TimeoutError("no reply"))
        log.answered()
    assert len(lines(caplog)) == 2  # the first outage's start and end; the rest stay quiet
