"""How N orchestrator processes on one port differ, and how they are asked for (no sockets)."""

from __future__ import annotations

import pytest

from cascade.settings import Settings
from cascade.shared_port import (
    default_process_count,
    local_stack_orchestrators,
    metrics_port_offset,
    shared_port_env,
)
from devstack.cli import _parser

BASE = {"CASCADE_SERVER__PORT": "50051", "CASCADE_METRICS_PORT": "9464", "PATH": "/bin"}


def test_each_process_gets_reuse_port_and_its_own_metrics_port() -> None:
    envs = [shared_port_env(BASE, i, 3) for i in range(3)]
    assert [e["CASCADE_METRICS_PORT"] for e in envs] == ["9464", "9465", "9466"]
    assert {e["CASCADE_SERVER__REUSE_PORT"] for e in envs} == {"true"}
    assert {e["CASCADE_SERVER__PROCESSES"] for e in envs} == {"1"}  # children serve
    assert {e["CASCADE_SERVER__PORT"] for e in envs} == {"50051"}  # one port
    assert {e["PATH"] for e in envs} == {"/bin"}
    assert BASE["CASCADE_METRICS_PORT"] == "9464"  # the caller's mapping is not changed


def test_a_single_process_keeps_reuse_port_off() -> None:
    env = shared_port_env(BASE, 0, 1)
    assert env["CASCADE_SERVER__REUSE_PORT"] == "false"
    assert env["CASCADE_METRICS_PORT"] == "9464"


@pytest.mark.parametrize("port", [None, "0"])
def test_unset_or_free_metrics_port_is_left_alone(port: str | None) -> None:
    env = {} if port is None else {"CASCADE_METRICS_PORT": port}
    assert metrics_port_offset(env, 5).get("CASCADE_METRICS_PORT") == port


def test_bad_index_and_port_overflow_are_refused() -> None:
    with pytest.raises(ValueError, match="out of range"):
        shared_port_env(BASE, 2, 2)
    with pytest.raises(ValueError, match="not a port"):
        metrics_port_offset({"CASCADE_METRICS_PORT": "65535"}, 1)


def test_the_generated_environment_builds_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in shared_port_env(BASE, 1, 2).items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.server.reuse_port is True
    assert settings.server.processes == 1
    assert settings.metrics_port == 9465


def test_reuse_port_is_off_and_one_process_by_default() -> None:
    server = Settings().server
    assert server.reuse_port is False
    assert server.processes == 1


def test_orchestrators_flag_defaults_to_one_per_two_usable_cores() -> None:
    assert default_process_count() >= 1
    assert local_stack_orchestrators() == max(1, default_process_count() // 2)
    assert _parser().parse_args(["up"]).orchestrators == local_stack_orchestrators()
    assert _parser().parse_args(["loadtest"]).orchestrators == local_stack_orchestrators()
    assert _parser().parse_args(["up", "--orchestrators", "3"]).orchestrators == 3


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_orchestrators_flag_refuses_less_than_one(value: str) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["up", f"--orchestrators={value}"])
