"""Starting another commit's stack: reading its endpoint and choosing the flags it knows."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from loadtests.cli import add_arguments, run
from loadtests.compare import parse_endpoint, up_arguments
from loadtests.report import compare

UP_OUTPUT = """starting the local stack (logs in /x/.run/logs) ...
stack healthy in 7.2s
  scoring endpoint  grpc://127.0.0.1:43125  (cascade.v1.ScoringService/Score)
  redis redis://127.0.0.1:40001/0   nats nats://127.0.0.1:40002   triton grpc 127.0.0.1:40003
"""


def test_endpoint_from_cascade_up_output_or_a_listening_line() -> None:
    assert parse_endpoint(UP_OUTPUT) == "127.0.0.1:43125"
    assert parse_endpoint("LISTENING 127.0.0.1:5001\n") == "127.0.0.1:5001"
    assert parse_endpoint("starting the local stack ...\n") is None
    # Only the scoring endpoint counts, and only on loopback.
    assert parse_endpoint("triton grpc://127.0.0.1:9\n") is None
    assert parse_endpoint("  scoring endpoint  grpc://10.0.0.1:50051\n") is None


def test_up_arguments_pass_only_the_flags_that_checkout_lists() -> None:
    old_help = "usage: cascade up [--port PORT] [--redis-port REDIS_PORT] [--workers WORKERS]"
    assert up_arguments(old_help, workers=1, run_dir=Path("/r")) == [
        "--port",
        "0",
        "--redis-port",
        "0",
        "--workers",
        "1",
    ]
    new_help = old_help + " [--nats-port N] [--triton-grpc-port P] [--run-dir RUN_DIR]"
    args = up_arguments(new_help, workers=2, run_dir=Path("/r"))
    assert args[-2:] == ["--run-dir", "/r"]
    assert args[args.index("--nats-port") + 1] == "0"
    assert args[args.index("--triton-grpc-port") + 1] == "0"
    # cascade up's own default is one orchestrator per core: the count is always passed on.
    assert "--orchestrators" not in up_arguments(old_help, workers=1, run_dir=Path("/r"))
    counted = up_arguments(
        new_help + " [--orchestrators N]", workers=2, run_dir=Path("/r"), orchestrators=1
    )
    assert counted[counted.index("--orchestrators") + 1] == "1"


def test_compare_names_the_two_sides() -> None:
    def target(cap: float, p50: float) -> dict[str, object]:
        serial = {"latency_ms": {"p50": p50, "p99": 2 * p50}}
        return {"serial": serial, "steps": [], "capacity": {"rate": cap}}

    comp = compare(target(300, 2.0), target(200, 3.0), ("cascade", "compare"))
    assert comp["names"] == ["cascade", "compare"]
    assert comp["capacity_rate"] == {"cascade": 300, "compare": 200, "ratio": 1.5}
    assert comp["serial_latency"]["p50"] == {"cascade_ms": 2.0, "compare_ms": 3.0, "ratio": 1.5}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--compare-env", "CASCADE_ADMISSION__MAX_QUEUE_MS=5"], "needs --compare-ref"),
        (["--compare-ref", "HEAD", "--compare-env", "NO_EQUALS_SIGN"], "--compare-env"),
    ],
)
def test_loadtest_refuses_compare_env_it_cannot_apply_before_starting_anything(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "out"
    assert run(parser.parse_args([*argv, "--out", str(out)])) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
