"""Only loopback targets are accepted."""

from __future__ import annotations

import pytest

from loadtests.address import LoopbackTarget, NotLoopbackError, parse_loopback_target


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:50051", LoopbackTarget("127.0.0.1", 50051)),
        ("127.8.9.10:80", LoopbackTarget("127.8.9.10", 80)),
        ("localhost:5", LoopbackTarget("localhost", 5)),
        ("LOCALHOST:5", LoopbackTarget("localhost", 5)),
        ("[::1]:7", LoopbackTarget("::1", 7)),
        (" 127.0.0.1:1 ", LoopbackTarget("127.0.0.1", 1)),
    ],
)
def test_loopback_targets_are_accepted(text: str, expected: LoopbackTarget) -> None:
    assert parse_loopback_target(text) == expected


def test_grpc_target_brackets_ipv6() -> None:
    assert parse_loopback_target("[::1]:7").grpc_target == "[::1]:7"
    assert parse_loopback_target("127.0.0.1:7").grpc_target == "127.0.0.1:7"


@pytest.mark.parametrize(
    "text",
    [
        "10.0.0.1:80",
        "192.168.1.1:80",
        "172.16.0.1:80",
        "8.8.8.8:53",
        "0.0.0.0:80",
        "[::]:80",
        "[2001:db8::1]:80",
        "example.com:80",
        "localhost.example.com:80",
    ],
)
def test_other_addresses_are_refused(text: str) -> None:
    with pytest.raises(NotLoopbackError, match="loopback"):
        parse_loopback_target(text)


@pytest.mark.parametrize(
    "text", ["127.0.0.1", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:70000", "::1:80", ":80", "[::1]"]
)
def test_malformed_targets_are_refused(text: str) -> None:
    with pytest.raises(NotLoopbackError):
        parse_loopback_target(text)
