"""The supervisor's pure parts: the backoff and what ``cascade up`` prints about restarts."""

from __future__ import annotations

import pytest

from devstack.cli import restart_line, restart_summary
from devstack.supervision import Backoff, RestartEvent


def test_backoff_doubles_from_initial_and_stops_at_the_cap() -> None:
    backoff = Backoff(initial_s=0.2, factor=2.0, max_s=1.0)
    assert [backoff.delay_s(n) for n in range(5)] == pytest.approx([0.2, 0.4, 0.8, 1.0, 1.0])


def test_backoff_never_overflows_for_a_long_crash_loop() -> None:
    assert Backoff(initial_s=0.2, max_s=10.0).delay_s(100_000) == 10.0


@pytest.mark.parametrize(
    "kwargs", [{"initial_s": -1.0}, {"initial_s": 2.0, "max_s": 1.0}, {"factor": 0.5}]
)
def test_backoff_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="initial_s"):
        Backoff(**kwargs)


def test_backoff_rejects_a_negative_attempt() -> None:
    with pytest.raises(ValueError, match="attempt"):
        Backoff().delay_s(-1)


def test_restart_line_names_the_child_its_status_and_the_count() -> None:
    back = RestartEvent("screening-worker-1", -9, 3, 0.8, ready_at=12.0)
    assert restart_line(back) == (
        "screening-worker-1 exited with status -9: restart #3 after 0.80 s, back"
    )
    failed = RestartEvent("triton-18001", 1, 1, 0.2, error="not ready after 120.0 s")
    assert "restart failed (not ready after 120.0 s)" in restart_line(failed)


def test_restart_summary_lists_restarted_children_sorted() -> None:
    assert restart_summary({}) == "restarts: none"
    assert restart_summary({"redis-16379": 1, "nats-14222": 2}) == (
        "restarts: nats-14222 2, redis-16379 1"
    )
