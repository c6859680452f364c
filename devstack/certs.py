"""A local certificate authority for the secure stack (``cascade up --tls``) and the tests.

Pure functions over the ``cryptography`` package: :func:`new_ca` makes a self-signed CA,
:func:`issue` a certificate it signs for a server (names in the subject alternative names, as TLS
clients check) or for a client (its common name is the caller's identity at the orchestrator).
Keys are ECDSA P-256: small, fast to make, and understood by gRPC, nats-server and Redis.
:func:`write_stack_certificates` writes the set the local stack uses into a folder, keys
readable by their owner only. Nothing here is meant for production: a real deployment gets its
certificates from its own PKI.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "LOCAL_HOSTS",
    "Issued",
    "StackCertificates",
    "Usage",
    "issue",
    "new_ca",
    "write_stack_certificates",
]

LOCAL_HOSTS: Final[tuple[str, ...]] = ("127.0.0.1", "localhost")
"""The names a loopback server's certificate carries."""

_CA_DAYS: Final = 365
_LEAF_DAYS: Final = 90
# Clocks of the processes that check a certificate may be a little behind the one that made it.
_BACKDATE: Final = dt.timedelta(minutes=5)


class Usage(StrEnum):
    """What a leaf certificate is for (its extended key usage)."""

    SERVER = "server"
    CLIENT = "client"


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def certificate(self) -> x509.Certificate:
        """The parsed certificate."""
        return x509.load_pem_x509_certificate(self.cert_pem)

    def write(self, folder: Path, name: str) -> tuple[Path, Path]:
        """Write ``<name>.crt`` and ``<name>.key`` (mode 0600) into ``folder``; their paths."""
        folder.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
        cert_path.write_bytes(self.cert_pem)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(self.key_pem)
        return cert_path, key_path


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fraud-cascade local"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_ca(
    common_name: str = "fraud-cascade local CA",
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Issued:
    """A self-signed CA certificate (valid a year from five minutes ago unless told)."""
    start = not_before or _now() - _BACKDATE
    end = not_after or start + dt.timedelta(days=_CA_DAYS)
    key = _new_key()
    subject = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue(
    ca: Issued,
    common_name: str,
    usage: Usage,
    *,
    hosts: Sequence[str] = (),
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Issued:
    """A leaf certificate signed by ``ca`` for ``common_name``.

    A server's ``hosts`` (IP addresses or DNS names) become its subject alternative names, which
    is what TLS clients match the address against. A client certificate names its caller in the
    common name (and in a DNS alternative name, for checkers that look only there). Valid 90 days
    from five minutes ago unless ``not_before``/``not_after`` say otherwise (an already expired
    one, for tests).
    """
    ca_cert = ca.certificate
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError("the CA key must be an EC key made by new_ca")
    start = not_before or _now() - _BACKDATE
    end = not_after or start + dt.timedelta(days=_LEAF_DAYS)
    key = _new_key()
    names = [_alt_name(h) for h in hosts] if usage is Usage.SERVER else [x509.DNSName(common_name)]
    purpose = (
        ExtendedKeyUsageOID.SERVER_AUTH
        if usage is Usage.SERVER
        else (ExtendedKeyUsageOID.CLIENT_AUTH)
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


@dataclass(frozen=True, slots=True)
class StackCertificates:
    """Where :func:`write_stack_certificates` put the local stack's files."""

    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_identity: str


def write_stack_certificates(
    folder: Path, *, client_identity: str = "cascade-cli", hosts: Sequence[str] = LOCAL_HOSTS
) -> StackCertificates:
    """A new CA, a server certificate for ``hosts`` (the orchestrator, NATS and Redis share it)
    and a client certificate for ``client_identity``, written into ``folder``."""
    ca = new_ca()
    ca_file, _ = ca.write(folder, "ca")
    server_cert, server_key = issue(
        ca, "fraud-cascade local server", Usage.SERVER, hosts=hosts
    ).write(folder, "server")
    client_cert, client_key = issue(ca, client_identity, Usage.CLIENT).write(folder, "client")
    return StackCertificates(
        ca_file=ca_file,
        server_cert=server_cert,
        server_key=server_key,
        client_cert=client_cert,
        client_key=client_key,
        client_identity=client_identity,
    )
