"""The local nats-server's environment: one Go processor unless the caller's environment says."""

from __future__ import annotations

import pytest

from devstack.servers.nats import go_environment


def test_go_gets_the_processors_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOMAXPROCS", raising=False)
    monkeypatch.setenv("CASCADE_MARKER", "kept")
    env = go_environment(1)
    assert env is not None
    assert env["GOMAXPROCS"] == "1"
    assert env["CASCADE_MARKER"] == "kept"  # the rest of the environment is inherited
    assert go_environment(None) is None


def test_an_environment_that_sets_gomaxprocs_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOMAXPROCS", "4")
    assert go_environment(1) is None


def test_zero_processors_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOMAXPROCS", raising=False)
    with pytest.raises(ValueError, match="go_max_procs"):
        go_environment(0)
