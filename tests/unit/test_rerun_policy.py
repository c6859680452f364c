"""When tests/conftest.py lets a failed attempt run again: its first reruns always, later ones
only when the host took a stolen share of the cores' time during that attempt."""

from __future__ import annotations

from typing import cast

import pytest

from tests.conftest import _STEAL, STOLEN_SHARE, _may_rerun


class _Attempt:
    """What :func:`_may_rerun` reads of a pytest item: its attempt number and stash."""

    def __init__(self, number: int, steal: float | None) -> None:
        self.execution_count = number
        self.stash = pytest.Stash()
        self.stash[_STEAL] = steal


def may_rerun(number: int, steal: float | None, base: int) -> bool:
    return _may_rerun(cast(pytest.Item, _Attempt(number, steal)), base)


def test_the_first_reruns_do_not_ask_about_the_host() -> None:
    assert may_rerun(1, 0.0, base=2) and may_rerun(2, None, base=2)


def test_later_ones_need_a_stolen_attempt() -> None:
    assert not may_rerun(3, 0.0, base=2)
    assert not may_rerun(3, STOLEN_SHARE - 0.01, base=2)
    assert not may_rerun(3, None, base=2)  # nothing measured: no excuse
    assert may_rerun(3, STOLEN_SHARE, base=2)
    assert may_rerun(5, 0.6, base=2)


def test_a_wallclock_unit_test_reruns_only_when_stolen() -> None:
    assert not may_rerun(1, 0.05, base=0)
    assert may_rerun(1, 0.6, base=0)
