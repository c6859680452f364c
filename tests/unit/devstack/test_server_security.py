"""The config lines that secure the local NATS and Redis servers (pure, no processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from devstack.servers import Credentials, ServerTls
from devstack.servers.nats import nats_security_config
from devstack.servers.redis import acl_config


def test_nats_config_names_the_tls_files_and_the_login() -> None:
    text = nats_security_config(
        ServerTls(Path("/t/s.crt"), Path("/t/s.key"), client_ca_file=Path("/t/ca.crt")),
        Credentials("cascade", 'p"w'),
    )
    assert 'cert_file: "/t/s.crt"' in text and 'key_file: "/t/s.key"' in text
    assert 'ca_file: "/t/ca.crt"' in text and "verify: true" in text
    assert 'user: "cascade"' in text and 'password: "p\\"w"' in text
    assert nats_security_config(None, None) == ""
    assert "verify" not in nats_security_config(ServerTls(Path("c"), Path("k")), None)


def test_redis_acl_turns_the_default_user_off() -> None:
    text = acl_config(Credentials("cascade", "s3cret"))
    assert text.splitlines() == ["user default off", "user cascade on >s3cret ~* &* +@all"]
    with pytest.raises(ValueError, match="spaces"):
        acl_config(Credentials("cascade", "two words"))


def test_credentials_hide_the_password() -> None:
    assert "s3cret" not in repr(Credentials("cascade", "s3cret"))
