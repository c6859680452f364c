"""When tests/conftest.py lets a failed attempt run again: its first reruns always, later ones
only on a slow host (a stolen share of the cores' time, or a fixed workload running slower)."""

from __future__ import annotations

from typing import cast

import pytest

from tests.conftest import _SLOWDOWN, _STEAL, SLOW_HOST_SLOWDOWN, STOLEN_SHARE, _may_rerun


class _Attempt:
    """What :func:`_may_rerun` reads of a pytest item: its attempt number and stash."""

    def __init__(self, number: int, steal: float | None, slower: float | None) -> None:
        self.execution_count = number
        self.stash = pytest.Stash()
        self.stash[_STEAL] = steal
        if slower is not None:
            self.stash[_SLOWDOWN] = slower


def may_rerun(number: int, steal: float | None, base: int, slower: float | None = None) -> bool:
    return _may_rerun(cast(pytest.Item, _Attempt(number, steal, slower)), base)


def test_the_first_reruns_do_not_ask_about_the_host() -> None:
    assert may_rerun(1, 0.0, base=2) and may_rerun(2, None, base=2)


def test_later_ones_need_a_stolen_attempt() -> None:
    assert not may_rerun(3, 0.0, base=2)
    assert not may_rerun(3, STOLEN_SHARE - 0.01, base=2)
    assert not may_rerun(3, None, base=2)  # nothing measured: no excuse
    assert may_rerun(3, STOLEN_SHARE, base=2)
    assert may_rerun(5, 0.6, base=2)


def test_or_a_host_that_runs_a_fixed_workload_slower() -> None:
    assert not may_rerun(3, 0.02, base=2, slower=SLOW_HOST_SLOWDOWN - 0.1)
    assert may_rerun(3, 0.02, base=2, slower=SLOW_HOST_SLOWDOWN)
    assert may_rerun(6, None, base=2, slower=4.7)


def test_a_wallclock_unit_test_reruns_only_on_a_slow_host() -> None:
    assert not may_rerun(1, 0.05, base=0)
    assert not may_rerun(1, 0.05, base=0, slower=1.2)
    assert may_rerun(1, 0.6, base=0)
    assert may_rerun(1, 0.05, base=0, slower=3.0)
