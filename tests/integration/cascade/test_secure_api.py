"""TLS, mutual TLS, bearer tokens and per-caller quotas on a real orchestrator.

Each test starts the orchestrator in this process on real Redis and NATS (no screening worker
and no Triton: Score answers the labelled default at once, which is all these tests need: the
call got through, or was refused with the status under test). Certificates are made per test
in its temporary folder by :mod:`devstack.certs`; tokens are random per test.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import secrets
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from pydantic import SecretStr

from cascade.settings import (
    AuthSettings,
    CallerLimits,
    CallerSettings,
    DecisionLogSettings,
    NatsSettings,
    PseudonymSettings,
    RedisSettings,
    ServerSettings,
    ServerTlsSettings,
    Settings,
    TritonSettings,
)
from cascade.v1 import scoring_pb2, scoring_pb2_grpc
from devstack.certs import Issued, Usage, issue, new_ca
from devstack.servers import NatsServer, RedisServer, free_port
from orchestrator.callers import token_digest
from orchestrator.server import RETRY_AFTER_MS_KEY, Orchestrator
from tests.conftest import TEST_PSEUDONYM_KEY
from tests.integration.cascade.conftest import new_request

pytestmark = pytest.mark.integration

Code = grpc.StatusCode


def _settings(
    model_dir: Path,
    redis: RedisServer,
    nats: NatsServer,
    *,
    tls: ServerTlsSettings | None = None,
    auth: AuthSettings | None = None,
) -> Settings:
    return Settings(
        model_dir=model_dir,
        decision_log=DecisionLogSettings(
            spool_dir=Path(tempfile.mkdtemp(prefix="cascade-test-spool-"))
        ),
        redis=RedisSettings(url=redis.url),
        nats=NatsSettings(url=nats.url, subject_prefix=f"t{uuid.uuid4().hex[:8]}"),
        # Nobody listens there: stage 2 is never reached without a worker anyway.
        triton=TritonSettings(url=f"127.0.0.1:{free_port()}"),
        server=ServerSettings(
            port=0, drain_s=0.5, shutdown_delay_s=0.0, tls=tls or ServerTlsSettings()
        ),
        auth=auth or AuthSettings(),
        pseudonym=PseudonymSettings(key=SecretStr(TEST_PSEUDONYM_KEY)),
    )


@asynccontextmanager
async def orchestrator(settings: Settings) -> AsyncIterator[Orchestrator]:
    provider = TracerProvider()
    try:
        async with Orchestrator(settings, tracer_provider=provider) as app:
            yield app
    finally:
        provider.shutdown()


class Pki:
    """A CA, a server certificate for 127.0.0.1 and files for them in ``folder``."""

    def __init__(self, folder: Path, name: str = "ca") -> None:
        self.folder = folder
        self.ca = new_ca(f"test CA {name}")
        self.ca_file, _ = self.ca.write(folder, name)
        server = issue(self.ca, "orchestrator", Usage.SERVER, hosts=("127.0.0.1",))
        self.server_cert, self.server_key = server.write(folder, f"{name}-server")

    def client(
        self,
        identity: str,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> Issued:
        return issue(self.ca, identity, Usage.CLIENT, not_before=not_before, not_after=not_after)

    def tls(self, *, mutual: bool = False) -> ServerTlsSettings:
        return ServerTlsSettings(
            cert_file=self.server_cert,
            key_file=self.server_key,
            client_ca_file=self.ca_file if mutual else None,
        )


def channel(port: int, trust: Issued | None, client: Issued | None = None) -> grpc.aio.Channel:
    target = f"127.0.0.1:{port}"
    if trust is None:
        return grpc.aio.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=trust.cert_pem,
        private_key=client.key_pem if client else None,
        certificate_chain=client.cert_pem if client else None,
    )
    # A fresh connection per channel: no subchannel shared with an earlier (refused) one.
    return grpc.aio.secure_channel(
        target, credentials, options=[("grpc.use_local_subchannel_pool", 1)]
    )


async def score(ch: grpc.aio.Channel, token: str | None = None) -> scoring_pb2.ScoreResponse:
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    reply: scoring_pb2.ScoreResponse = await scoring_pb2_grpc.ScoringServiceStub(ch).Score(
        new_request(), timeout=2.0, metadata=metadata
    )
    return reply


async def score_code(ch: grpc.aio.Channel, token: str | None = None) -> grpc.StatusCode:
    try:
        await score(ch, token)
    except grpc.aio.AioRpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return Code.OK


async def health_status(ch: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(ch).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=2.0
    )
    return int(reply.status)


async def test_tls_serves_clients_that_trust_its_ca_and_refuses_plaintext(
    tmp_path: Path, model_dir: Path, redis_server: RedisServer, nats_server: NatsServer
) -> None:
    pki = Pki(tmp_path)
    other = Pki(tmp_path, "other")
    async with orchestrator(_settings(model_dir, redis_server, nats_server, tls=pki.tls())) as app:
        async with channel(app.port, pki.ca) as good:
            reply = await score(good)
            assert reply.transaction_id
            assert await health_status(good) == health_pb2.HealthCheckResponse.NOT_SERVING
        async with channel(app.port, other.ca) as wrong_ca:
            assert await score_code(wrong_ca) == Code.UNAVAILABLE
        async with channel(app.port, None) as plaintext:
            assert await score_code(plaintext) == Code.UNAVAILABLE


async def test_an_expired_server_certificate_is_refused_by_clients(
    tmp_path: Path, model_dir: Path, redis_server: RedisServer, nats_server: NatsServer
) -> None:
    pki = Pki(tmp_path)
    now = dt.datetime.now(dt.UTC)
    expired = issue(
        pki.ca,
        "orchestrator",
        Usage.SERVER,
        hosts=("127.0.0.1",),
        not_before=now - dt.timedelta(days=2),
        not_after=now - dt.timedelta(days=1),
    )
    cert, key = expired.write(tmp_path, "expired-server")
    tls = ServerTlsSettings(cert_file=cert, key_file=key)
    async with (
        orchestrator(_settings(model_dir, redis_server, nats_server, tls=tls)) as app,
        channel(app.port, pki.ca) as ch,
    ):
        assert await score_code(ch) == Code.UNAVAILABLE


async def test_mutual_tls_needs_a_valid_client_certificate_from_its_ca(
    tmp_path: Path, model_dir: Path, redis_server: RedisServer, nats_server: NatsServer
) -> None:
    pki = Pki(tmp_path)
    stranger = Pki(tmp_path, "stranger")
    now = dt.datetime.now(dt.UTC)
    settings = _settings(model_dir, redis_server, nats_server, tls=pki.tls(mutual=True))
    async with orchestrator(settings) as app:
        async with channel(app.port, pki.ca, pki.client("acme")) as good:
            assert (await score(good)).transaction_id
            # Health needs no identity: a probe's certificate from the CA is enough.
            assert await health_status(good) == health_pb2.HealthCheckResponse.NOT_SERVING
        expired = pki.client(
            "acme", not_before=now - dt.timedelta(days=2), not_after=now - dt.timedelta(days=1)
        )
        refused = {
            "expired": expired,
            "other CA": stranger.client("acme"),
            "no certificate": None,
        }
        for why, client in refused.items():
            async with channel(app.port, pki.ca, client) as ch:
                assert await score_code(ch) == Code.UNAVAILABLE, why


async def test_a_plaintext_health_port_serves_probes_and_nothing_else(
    tmp_path: Path, model_dir: Path, redis_server: RedisServer, nats_server: NatsServer
) -> None:
    """Under mutual TLS a probe without a client certificate (Kubernetes' gRPC probe) reads
    health on ``server.health_port``; scoring is not there at all."""
    pki = Pki(tmp_path)
    base = _settings(model_dir, redis_server, nats_server, tls=pki.tls(mutual=True))
    settings = base.model_copy(update={"server": base.server.model_copy(update={"health_port": 0})})
    async with orchestrator(settings) as app:
        assert app.health_port is not None and app.health_port != app.port
        async with (
            channel(app.health_port, None) as probe,
            channel(app.port, pki.ca, pki.client("acme")) as caller,
        ):
            assert await health_status(probe) == await health_status(caller)
            await app._set_serving(True)  # what the warm-up does once stage 1 answers
            assert await health_status(probe) == health_pb2.HealthCheckResponse.SERVING
            assert await score_code(probe) == Code.UNIMPLEMENTED
            assert (await score(caller)).transaction_id  # the main port still scores
        async with channel(app.port, None) as plaintext:  # and still wants mutual TLS
            assert await score_code(plaintext) == Code.UNAVAILABLE


async def test_the_client_certificate_names_the_caller_and_its_methods(
    tmp_path: Path, model_dir: Path, redis_server: RedisServer, nats_server: NatsServer
) -> None:
    pki = Pki(tmp_path)
    auth = AuthSettings(
        required=True,
        callers={"scorer-only": CallerSettings(methods=("Score",))},
    )
    settings = _settings(model_dir, redis_server, nats_server, tls=pki.tls(mutual=True), auth=auth)
    async with (
        orchestrator(settings) as app,
        channel(app.port, pki.ca, pki.client("scorer-only")) as ch,
    ):
        stub = scoring_pb2_grpc.ScoringServiceStub(ch)
        assert (await score(ch)).transaction_id
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ReportOutcome(scoring_pb2.ReportOutcomeRequest(), timeout=2.0)
        assert refused.value.code() == Code.PERMISSION_DENIED
        assert "scorer-only" in (refused.value.details() or "")
        # An unlisted certificate from the CA is authenticated, with the default methods.
        async with channel(app.port, pki.ca, pki.client("someone-else")) as other:
            with pytest.raises(grpc.aio.AioRpcError) as invalid:
                await scoring_pb2_grpc.ScoringServiceStub(other).ReportOutcome(
                    scoring_pb2.ReportOutcomeRequest(), timeout=2.0
                )
            assert invalid.value.code() == Code.INVALID_ARGUMENT


def _token_auth(tokens: dict[str, str], **limits: CallerSettings) -> AuthSettings:
    callers = {
        name: CallerSettings(token_sha256=(token_digest(token),)) for name, token in tokens.items()
    }
    callers.update(limits)
    return AuthSettings(required=True, callers=callers)


async def test_bearer_tokens_authenticate_and_health_and_reflection_stay_open(
    model_dir: Path, redis_server: RedisServer, nats_server: NatsServer
) -> None:
    token = secrets.token_urlsafe(24)
    settings = _settings(model_dir, redis_server, nats_server, auth=_token_auth({"acme": token}))
    async with orchestrator(settings) as app, channel(app.port, None) as ch:
        assert (await score(ch, token)).transaction_id
        assert await score_code(ch, secrets.token_urlsafe(24)) == Code.UNAUTHENTICATED
        assert await score_code(ch) == Code.UNAUTHENTICATED
        malformed = scoring_pb2_grpc.ScoringServiceStub(ch).Score(
            new_request(), timeout=2.0, metadata=(("authorization", f"Basic {token}"),)
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await malformed
        assert refused.value.code() == Code.UNAUTHENTICATED
        # Probes carry no credentials.
        assert await health_status(ch) == health_pb2.HealthCheckResponse.NOT_SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        async for response in reflect:
            names = {s.name for s in response.list_services_response.service}
            assert "cascade.v1.ScoringService" in names
            break


async def test_tokens_are_read_from_the_callers_file(
    tmp_path: Path, model_dir: Path, redis_server: RedisServer, nats_server: NatsServer
) -> None:
    token = secrets.token_urlsafe(24)
    callers_file = tmp_path / "callers.json"
    callers_file.write_text(
        f'{{"batch-job": {{"token_sha256": ["{token_digest(token)}"], "methods": ["ScoreBatch"]}}}}'
    )
    auth = AuthSettings(required=True, callers_file=callers_file)
    settings = _settings(model_dir, redis_server, nats_server, auth=auth)
    async with orchestrator(settings) as app, channel(app.port, None) as ch:
        stub = scoring_pb2_grpc.ScoringServiceStub(ch)
        metadata = (("authorization", f"Bearer {token}"),)
        batch = scoring_pb2.ScoreBatchRequest(transactions=[new_request().transaction])
        reply = await stub.ScoreBatch(batch, timeout=2.0, metadata=metadata)
        assert len(reply.results) == 1
        assert await score_code(ch, token) == Code.PERMISSION_DENIED


async def test_new_connections_get_renewed_certificates_without_a_restart(
    tmp_path: Path, model_dir: Path, redis_server: RedisServer, nats_server: NatsServer
) -> None:
    first = Pki(tmp_path / "first")
    second = Pki(tmp_path / "second")
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "server.crt", live / "server.key"
    cert.write_bytes(first.server_cert.read_bytes())
    key.write_bytes(first.server_key.read_bytes())
    tls = ServerTlsSettings(cert_file=cert, key_file=key)
    async with orchestrator(_settings(model_dir, redis_server, nats_server, tls=tls)) as app:
        held = channel(app.port, first.ca)
        async with held:
            assert (await score(held)).transaction_id
            # Renewed as a certificate manager does it: new files renamed over the old ones.
            for source, target in ((second.server_cert, cert), (second.server_key, key)):
                staged = target.with_suffix(".new")
                staged.write_bytes(source.read_bytes())
                os.replace(staged, target)
            async with channel(app.port, second.ca) as renewed:
                assert (await score(renewed)).transaction_id
            async with channel(app.port, first.ca) as old_trust:
                assert await score_code(old_trust) == Code.UNAVAILABLE
            # The connection made before the renewal keeps working.
            assert (await score(held)).transaction_id
        assert app.certificates is not None and app.certificates.reloads == 1


async def test_a_broken_renewal_keeps_the_previous_certificate(
    tmp_path: Path, model_dir: Path, redis_server: RedisServer, nats_server: NatsServer
) -> None:
    pki = Pki(tmp_path)
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "server.crt", live / "server.key"
    cert.write_bytes(pki.server_cert.read_bytes())
    key.write_bytes(pki.server_key.read_bytes())
    tls = ServerTlsSettings(cert_file=cert, key_file=key)
    async with orchestrator(_settings(model_dir, redis_server, nats_server, tls=tls)) as app:
        # A key that does not belong to the certificate: a renewal caught half way.
        key.write_bytes(issue(pki.ca, "x", Usage.SERVER, hosts=("127.0.0.1",)).key_pem)
        async with channel(app.port, pki.ca) as ch:
            assert (await score(ch)).transaction_id
        assert app.certificates is not None and app.certificates.reloads == 0


def _retry_after_ms(exc: grpc.aio.AioRpcError) -> tuple[int, float]:
    trailers = dict(exc.trailing_metadata() or ())
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info)
    return int(trailers[RETRY_AFTER_MS_KEY]), info.retry_delay.ToNanoseconds() / 1e6


async def _calls(
    ch: grpc.aio.Channel, token: str, count: int, interval_s: float
) -> Sequence[grpc.aio.AioRpcError | None]:
    outcomes: list[grpc.aio.AioRpcError | None] = []
    for _ in range(count):
        try:
            await score(ch, token)
            outcomes.append(None)
        except grpc.aio.AioRpcError as exc:
            outcomes.append(exc)
        await asyncio.sleep(interval_s)
    return outcomes


async def test_a_flooding_caller_is_limited_and_the_other_is_not(
    model_dir: Path, redis_server: RedisServer, nats_server: NatsServer
) -> None:
    noisy_token, quiet_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    auth = _token_auth(
        {},
        noisy=CallerSettings(token_sha256=(token_digest(noisy_token),), rate_per_s=10.0, burst=5.0),
        quiet=CallerSettings(token_sha256=(token_digest(quiet_token),), rate_per_s=10.0, burst=5.0),
    )
    settings = _settings(model_dir, redis_server, nats_server, auth=auth)
    async with AsyncExitStack() as stack:
        app = await stack.enter_async_context(orchestrator(settings))
        noisy_ch = await stack.enter_async_context(channel(app.port, None))
        quiet_ch = await stack.enter_async_context(channel(app.port, None))
        # The noisy caller floods: 60 calls at once (6 s of its quota); the quiet one sends 8
        # calls 0.2 s apart (5/s, within its own 10/s) during the flood.
        started = time.monotonic()

        async def flood() -> tuple[list[grpc.StatusCode], float]:
            codes = await asyncio.gather(*(score_code(noisy_ch, noisy_token) for _ in range(60)))
            return codes, time.monotonic() - started

        noisy = asyncio.create_task(flood())
        quiet = await _calls(quiet_ch, quiet_token, 8, 0.2)
        noisy_codes, flood_s = await noisy
    assert quiet == [None] * 8
    # At most the burst and what 10/s refilled while it flooded; everything else refused.
    assert noisy_codes.count(Code.OK) <= 5 + 10.0 * flood_s + 1
    assert noisy_codes.count(Code.OK) + noisy_codes.count(Code.RESOURCE_EXHAUSTED) == 60
    assert noisy_codes.count(Code.RESOURCE_EXHAUSTED) >= 60 - (5 + 10.0 * flood_s + 1)


async def test_a_refused_call_says_when_to_retry(
    model_dir: Path, redis_server: RedisServer, nats_server: NatsServer
) -> None:
    token = secrets.token_urlsafe(24)
    auth = _token_auth(
        {},
        slow=CallerSettings(token_sha256=(token_digest(token),), rate_per_s=2.0, burst=1.0),
    )
    settings = _settings(model_dir, redis_server, nats_server, auth=auth)
    async with orchestrator(settings) as app, channel(app.port, None) as ch:
        assert (await score(ch, token)).transaction_id
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await score(ch, token)
        assert refused.value.code() == Code.RESOURCE_EXHAUSTED
        header_ms, detail_ms = _retry_after_ms(refused.value)
        # 2/s: the next token is at most 500 ms away.
        assert 0 < header_ms <= 500 and 0 < detail_ms <= 500
        await asyncio.sleep(header_ms / 1000.0)
        assert (await score(ch, token)).transaction_id


async def test_anonymous_callers_share_the_default_limits(
    model_dir: Path, redis_server: RedisServer, nats_server: NatsServer
) -> None:
    auth = AuthSettings(default=CallerLimits(rate_per_s=1.0, burst=2.0))
    settings = _settings(model_dir, redis_server, nats_server, auth=auth)
    async with orchestrator(settings) as app, channel(app.port, None) as ch:
        codes = [await score_code(ch) for _ in range(4)]
    assert codes[:2] == [Code.OK, Code.OK]
    assert codes[2:] == [Code.RESOURCE_EXHAUSTED] * 2
