"""The local stack waits out an orchestrator's whole drain before it would SIGKILL it."""

from __future__ import annotations

import pytest

from devstack.stack import orchestrator_stop_grace_s


def test_grace_covers_the_configured_drain() -> None:
    # Defaults: 0.5 s shutdown delay + 5 s drain + the post-answer flush (2 s) + the decision
    # log's flush (3 s) + closing (3 s).
    assert orchestrator_stop_grace_s({}) == pytest.approx(13.5)
    env = {
        "CASCADE_SERVER__SHUTDOWN_DELAY_S": "0",
        "CASCADE_SERVER__DRAIN_S": "3",
        "CASCADE_DECISION_LOG__FLUSH_TIMEOUT_S": "1",
    }
    assert orchestrator_stop_grace_s(env) == pytest.approx(9.0)
