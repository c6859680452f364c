"""Load goes to loopback only: parse ``HOST:PORT`` targets and refuse anything else.

A load test on this project's machines may only send traffic to servers it runs itself on this
machine, so the check is deliberately strict: an IP literal must be in 127.0.0.0/8 or be ``::1``,
and the only name accepted is ``localhost``. Nothing is resolved through DNS.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

__all__ = ["LoopbackTarget", "NotLoopbackError", "parse_loopback_target"]


class NotLoopbackError(ValueError):
    """The target is not a loopback address (or is not ``HOST:PORT`` at all)."""


@dataclass(frozen=True, slots=True)
class LoopbackTarget:
    """A checked loopback endpoint."""

    host: str
    port: int

    @property
    def grpc_target(self) -> str:
        """The form grpc channels take (IPv6 literals in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_loopback_target(target: str) -> LoopbackTarget:
    """``"127.0.0.1:50051"``, ``"localhost:50051"`` or ``"[::1]:50051"`` -> target; else raise.

    Raises:
        NotLoopbackError: malformed, a port outside 1..65535, or a host that is not loopback.
    """
    text = target.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise NotLoopbackError(f"{target!r} is not [HOST]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise NotLoopbackError(f"{target!r} is not HOST:PORT")
        if ":" in host:
            raise NotLoopbackError(f"{target!r}: write IPv6 addresses as [ADDRESS]:PORT")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise NotLoopbackError(f"{target!r}: port must be a number within 1..65535")
    if host.lower() == "localhost":
        return LoopbackTarget("localhost", int(port_text))
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise NotLoopbackError(
            f"{target!r}: load goes to loopback only (127.0.0.0/8, ::1 or localhost)"
        ) from None
    if not address.is_loopback:
        raise NotLoopbackError(
            f"{target!r}: {host} is not a loopback address; refusing to send load"
        )
    return LoopbackTarget(str(address), int(port_text))
