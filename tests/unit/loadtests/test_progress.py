"""The progress line: its text, and that it draws in place and ends with a newline."""

from __future__ import annotations

import asyncio
import io

from loadtests.progress import ProgressLine, format_progress


def test_format_progress_shows_counts_in_flight_and_rate() -> None:
    line = format_progress(
        "cascade @500/s",
        2.0,
        10.0,
        {"scheduled": 5000, "sent": 1000, "ok": 990, "errors": 2, "timeouts": 3},
    )
    assert line.startswith("cascade @500/s")
    for part in (
        "2.0/10s",
        "sent 1000/5000",
        "ok 990",
        "err 2",
        "timeout 3",
        "in flight 5",
        "495/s",
    ):
        assert part in line
    assert "UNSENT" not in line


def test_format_progress_flags_unsent_requests() -> None:
    assert "UNSENT 7" in format_progress("x", 1.0, 1.0, {"unsent": 7})


async def test_progress_line_redraws_in_place_and_finishes_the_line() -> None:
    stream = io.StringIO()
    counts = {"sent": 0}
    async with ProgressLine("step", 1.0, lambda: counts, stream=stream, enabled=True):
        await asyncio.sleep(0.3)
        counts["sent"] = 5
    text = stream.getvalue()
    assert text.count("\r") >= 2 and text.endswith("\n") and text.count("\n") == 1
    assert "sent 5/0" in text.rsplit("\r", 1)[-1]


async def test_progress_line_is_silent_when_disabled() -> None:
    stream = io.StringIO()
    async with ProgressLine("step", 1.0, dict, stream=stream, enabled=False):
        await asyncio.sleep(0.01)
    assert stream.getvalue() == ""
