"""What the NATS and Redis clients are told about credentials and TLS (no sockets)."""

from __future__ import annotations

import ssl
from pathlib import Path

from pydantic import SecretStr

from cascade.nats_connection import connect_options
from cascade.settings import NatsSettings, RedisSettings
from devstack.certs import write_stack_certificates
from orchestrator.redis_pipeline import RedisAddress, redis_connect_options


def test_plain_nats_gets_no_options() -> None:
    assert connect_options(None) == {}
    assert connect_options(NatsSettings()) == {}


def test_nats_credentials_and_a_ca_give_a_login_and_a_verifying_context(tmp_path: Path) -> None:
    certs = write_stack_certificates(tmp_path)
    options = connect_options(
        NatsSettings(
            url="tls://127.0.0.1:4222",
            user="cascade",
            password=SecretStr("pw"),
            tls_ca_file=certs.ca_file,
            tls_cert_file=certs.client_cert,
            tls_key_file=certs.client_key,
        )
    )
    assert options["user"] == "cascade" and options["password"] == "pw"
    context = options["tls"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert any(c["subject"] for c in context.get_ca_certs())


def test_a_tls_url_alone_trusts_the_system_cas() -> None:
    options = connect_options(NatsSettings(url="tls://nats.internal:4222"))
    assert set(options) == {"tls"}


def test_secrets_do_not_show_in_the_settings_repr() -> None:
    settings = NatsSettings(user="u", password=SecretStr("hunter2"))
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in repr(RedisSettings(password=SecretStr("hunter2")))


def test_redis_acl_user_and_password_replace_the_urls() -> None:
    assert redis_connect_options(None) == {}
    options = redis_connect_options(
        RedisSettings(url="redis://old:pw@127.0.0.1/0", username="cascade", password=SecretStr("s"))
    )
    assert options == {"username": "cascade", "password": "s"}
    assert RedisAddress.from_url("rediss://u:p@h:1/2") == RedisAddress("h", 1, 2, "u", "p", True)


def test_redis_tls_files_give_a_verifying_context(tmp_path: Path) -> None:
    certs = write_stack_certificates(tmp_path)
    options = redis_connect_options(
        RedisSettings(url="rediss://127.0.0.1:6380/0", tls_ca_file=certs.ca_file)
    )
    assert isinstance(options["tls"], ssl.SSLContext)
