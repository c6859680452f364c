"""What a local server needs to be secured: its TLS files and the credentials clients log in
with. Values only; each server writes them into its own config file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["Credentials", "ServerTls"]


@dataclass(frozen=True, slots=True)
class ServerTls:
    """A local server's TLS files: its certificate and key, and optionally the CA whose client
    certificates it requires."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    handshake_first: bool = False
    """NATS only: TLS before any protocol byte (``tls { handshake_first: true }``), so not even
    the ``INFO`` that says TLS is required goes out in the clear to be stripped."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """A user and password clients must log in with (``repr`` hides the password)."""

    user: str
    password: str

    def __repr__(self) -> str:
        return f"Credentials(user={self.user!r}, password='***')"
