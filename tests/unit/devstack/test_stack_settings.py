"""Settings handed to the local stack: env files, --set pairs, and their checking."""

from __future__ import annotations

import argparse

import pytest

from devstack.stack_settings import (
    SettingsInputError,
    check_settings,
    parse_assignments,
    parse_env_file,
    positive_int,
)


def test_env_file_lines_comments_quotes_and_export() -> None:
    text = """
# budget for this run
CASCADE_BUDGET__SLO_MS=30
export CASCADE_METRICS_PORT = 9464
CASCADE_DEFAULT_DECISION="DECLINE"
OTEL_SERVICE_NAME='my orchestrator'
"""
    assert parse_env_file(text) == {
        "CASCADE_BUDGET__SLO_MS": "30",
        "CASCADE_METRICS_PORT": "9464",
        "CASCADE_DEFAULT_DECISION": "DECLINE",
        "OTEL_SERVICE_NAME": "my orchestrator",
    }


def test_env_file_error_names_the_line() -> None:
    with pytest.raises(SettingsInputError, match=r"f\.env line 3: expected KEY=VALUE"):
        parse_env_file("A=1\n\nnot an assignment\n", name="f.env")


def test_keys_the_stack_owns_are_refused_with_the_flag_to_use() -> None:
    with pytest.raises(
        SettingsInputError, match=r"CASCADE_SERVER__PORT is set by the stack.*--port"
    ):
        parse_assignments(["CASCADE_SERVER__PORT=1"])
    with pytest.raises(SettingsInputError, match="--redis-port"):
        parse_env_file("CASCADE_REDIS__URL=redis://x\n")


def test_later_assignments_win() -> None:
    assert parse_assignments(["A=1", "A=2", "B="]) == {"A": "2", "B": ""}


def test_check_settings_builds_them_and_names_a_bad_variable() -> None:
    settings = check_settings({"CASCADE_BUDGET__SLO_MS": "30", "CASCADE_METRICS_PORT": "9999"})
    assert settings.budget.slo_ms == 30 and settings.metrics_port == 9999
    with pytest.raises(SettingsInputError, match=r"^CASCADE_BUDGET__SLO_MS: .*greater than 0"):
        check_settings({"CASCADE_BUDGET__SLO_MS": "-1"})
    with pytest.raises(SettingsInputError, match="CASCADE_DEFAULT_DECISION"):
        check_settings({"CASCADE_DEFAULT_DECISION": "MAYBE"})


def test_counts_must_be_positive() -> None:
    assert positive_int("3") == 3
    with pytest.raises(argparse.ArgumentTypeError, match="at least 1, got 0"):
        positive_int("0")
    with pytest.raises(ValueError, match="invalid literal"):
        positive_int("two")
