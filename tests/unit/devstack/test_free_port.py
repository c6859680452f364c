"""free_port never hands out a port twice in a row, even when the kernel offers it again."""

from __future__ import annotations

import pytest

from devstack.servers import _process


def test_a_port_the_kernel_offers_again_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    offered = iter([40001, 40001, 40001, 40002])
    monkeypatch.setattr(_process, "_ephemeral_port", lambda: next(offered))
    monkeypatch.setattr(_process, "_HANDED_OUT", {})
    assert [_process.free_port(), _process.free_port()] == [40001, 40002]


def test_gives_up_loudly_when_only_handed_out_ports_come_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_process, "_ephemeral_port", lambda: 40001)
    monkeypatch.setattr(_process, "_HANDED_OUT", {})
    assert _process.free_port() == 40001
    with pytest.raises(OSError, match="no fresh loopback port"):
        _process.free_port()


def test_real_ports_are_distinct_and_bindable() -> None:
    ports = [_process.free_port() for _ in range(20)]
    assert len(set(ports)) == 20
    assert all(_process.port_is_free(p) for p in ports)
