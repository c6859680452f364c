"""The local CA: what the certificates it issues say, checked with the ssl module (no sockets)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devstack.certs import Usage, issue, new_ca, write_stack_certificates


def test_a_server_certificate_names_its_hosts_and_chains_to_the_ca() -> None:
    ca = new_ca()
    server = issue(ca, "srv", Usage.SERVER, hosts=("127.0.0.1", "localhost"))
    cert = server.certificate
    assert cert.issuer == ca.certificate.subject
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    cert.verify_directly_issued_by(ca.certificate)  # raises unless the CA signed it
    with pytest.raises(InvalidSignature):
        cert.verify_directly_issued_by(new_ca().certificate)  # same name, another key


def test_a_client_certificate_names_its_caller() -> None:
    client = issue(new_ca(), "acme-payments", Usage.CLIENT).certificate
    (cn,) = client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert cn.value == "acme-payments"
    usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not client.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_validity_can_be_set_for_an_expired_certificate() -> None:
    now = dt.datetime.now(dt.UTC)
    ca = new_ca()
    assert ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    expired = issue(
        ca,
        "old",
        Usage.CLIENT,
        not_before=now - dt.timedelta(days=2),
        not_after=now - dt.timedelta(days=1),
    ).certificate
    assert expired.not_valid_after_utc < now
    fresh = issue(ca, "new", Usage.CLIENT).certificate
    assert fresh.not_valid_before_utc < now < fresh.not_valid_after_utc


def test_the_stack_set_loads_into_tls_contexts_and_keys_are_private(tmp_path: Path) -> None:
    files = write_stack_certificates(tmp_path / "tls", client_identity="cli")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(files.server_cert, files.server_key)
    server.load_verify_locations(cafile=files.ca_file)
    client = ssl.create_default_context(cafile=files.ca_file)
    client.load_cert_chain(files.client_cert, files.client_key)
    for key in (files.server_key, files.client_key, tmp_path / "tls" / "ca.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert files.client_identity == "cli"
