"""The orchestrator port's TLS credentials, re-read when their files change: no restart.

gRPC asks :meth:`ReloadingCertificates.fetch` for the certificate configuration at every new
connection's handshake (``grpc.dynamic_ssl_server_credentials``); it answers None ("unchanged")
after one ``stat`` per file unless a file's modification time, size or inode changed, so renewing
certificates in place (or by renaming new files over the old ones) takes effect for the next
connection, and connections already open keep theirs. A changed set that does not load (a key
that does not match its certificate, a file half written) is logged and the previous set kept;
it is tried again once a file changes again.

Every orchestrator process sharing the port (``SO_REUSEPORT``) reads the same files on its own.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Sequence
from pathlib import Path

import grpc

from cascade.errors import ConfigurationError
from cascade.settings import ServerTlsSettings

__all__ = ["ReloadingCertificates", "server_credentials"]

logger = logging.getLogger(__name__)

_Stamp = tuple[tuple[int, int, int], ...]


class ReloadingCertificates:
    """The certificate configuration of ``settings``' files, fetched again when they change."""

    def __init__(self, settings: ServerTlsSettings) -> None:
        if settings.cert_file is None or settings.key_file is None:
            raise ConfigurationError("server TLS needs server.tls.cert_file and key_file")
        self._cert = settings.cert_file
        self._key = settings.key_file
        self._ca = settings.client_ca_file
        self._paths: Sequence[Path] = tuple(
            p for p in (self._cert, self._key, self._ca) if p is not None
        )
        self.reloads = 0
        """How many times a changed set was loaded (for tests and logs)."""
        self._stamp = self._stamp_now()
        self._failed: _Stamp | None = None
        try:
            self.initial = self._load()
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConfigurationError(f"server TLS files unusable: {exc}") from exc

    @property
    def mutual(self) -> bool:
        """Whether clients must present a certificate."""
        return self._ca is not None

    def _stamp_now(self) -> _Stamp:
        stamps = []
        for path in self._paths:
            try:
                st = os.stat(path)
            except OSError:
                stamps.append((0, 0, 0))
            else:
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamps)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        cert, key = self._cert.read_bytes(), self._key.read_bytes()
        ca = self._ca.read_bytes() if self._ca is not None else None
        # gRPC would accept a mismatched pair here and fail every handshake later; check first.
        check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        check.load_cert_chain(self._cert, self._key)
        if self._ca is not None:
            check.load_verify_locations(cafile=self._ca)
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate-configuration fetcher: None while the files are unchanged."""
        stamp = self._stamp_now()
        if stamp == self._stamp or stamp == self._failed:
            return None
        try:
            config = self._load()
        except (OSError, ssl.SSLError, ValueError) as exc:
            # Once per broken set: the next change of any file is tried again.
            self._failed = stamp
            logger.warning("TLS files changed but do not load, keeping the previous: %s", exc)
            return None
        self._stamp = stamp
        self.reloads += 1
        logger.info("TLS files changed: new connections get the new certificate")
        return config


def server_credentials(certificates: ReloadingCertificates) -> grpc.ServerCredentials:
    """Server credentials that fetch ``certificates`` at each handshake (mutual TLS when they
    name a client CA)."""
    return grpc.dynamic_ssl_server_credentials(
        certificates.initial,
        certificates.fetch,
        require_client_authentication=certificates.mutual,
    )
