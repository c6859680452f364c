"""ThrottledLog: one line per interval at most, each saying how many events it stands for."""

from __future__ import annotations

import logging
import math

import pytest

from cascade.throttled_log import ThrottledLog


def test_throttled_log_writes_one_line_per_interval_with_the_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    log = ThrottledLog(logging.getLogger("test.throttle"), interval_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.throttle"):
        for _ in range(5000):
            log.event("bad %s", "bodies")
            now[0] += 0.001  # 5 s in all
        now[0] += 6.0
        log.event("bad %s", "bodies")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("bad bodies; 1 since")
    assert lines[1].startswith("bad bodies; 5000 since")
    assert math.isclose(now[0], 111.0)


def test_throttled_log_logs_again_at_once_after_a_quiet_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    log = ThrottledLog(logging.getLogger("test.throttle"), interval_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.throttle"):
        log.event("one")
        now[0] = 60.0
        log.event("two")
    assert [r.getMessage().split(";")[0] for r in caplog.records] == ["one", "two"]
    assert all(r.levelname == "WARNING" and r.exc_info is None for r in caplog.records)
