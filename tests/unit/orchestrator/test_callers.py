"""Caller identities: bearer tokens, certificate names, methods and quotas (no sockets)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from pydantic import ValidationError

from cascade.errors import (
    PermissionDeniedError,
    QuotaExceededError,
    UnauthenticatedError,
    grpc_status_for,
)
from cascade.settings import (
    AuthSettings,
    CallerLimits,
    CallerSettings,
    ServerSettings,
    ServerTlsSettings,
    Settings,
)
from orchestrator.callers import (
    ANONYMOUS,
    CallerGuard,
    bearer_token,
    certificate_identity,
    guard_needed,
    token_digest,
)


@dataclass
class Call:
    """What a servicer context tells the guard about one call."""

    metadata: Sequence[tuple[str, str | bytes]] = ()
    peer: Mapping[str, Iterable[bytes]] = field(default_factory=dict)

    def invocation_metadata(self) -> Sequence[tuple[str, str | bytes]]:
        return self.metadata

    def auth_context(self) -> Mapping[str, Iterable[bytes]]:
        return self.peer


def bearer(token: str) -> Call:
    return Call(metadata=(("authorization", f"Bearer {token}"),))


def cert(common_name: str) -> Call:
    return Call(peer={"x509_common_name": [common_name.encode()]})


def _mtls(tmp_path: Path, auth: AuthSettings) -> Settings:
    ca = tmp_path / "ca.crt"
    tls = ServerTlsSettings(
        cert_file=tmp_path / "s.crt", key_file=tmp_path / "s.key", client_ca_file=ca
    )
    return Settings(server=ServerSettings(tls=tls), auth=auth)


def test_the_digest_is_the_hex_sha256_of_the_token() -> None:
    assert token_digest("s3cret") == hashlib.sha256(b"s3cret").hexdigest()


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ((), None),
        ((("x-other", "v"),), None),
        ((("authorization", "Bearer abc"),), "abc"),
        ((("authorization", "bearer  abc "),), "abc"),
        ((("authorization", b"Bearer abc"),), "abc"),
    ],
)
def test_bearer_tokens_are_read_from_the_authorization_entry(
    metadata: Sequence[tuple[str, str | bytes]], token: str | None
) -> None:
    assert bearer_token(metadata) == token


@pytest.mark.parametrize("value", ["Basic abc", "Bearer", "Bearer   ", "abc"])
def test_an_authorization_entry_that_is_no_bearer_token_is_refused(value: str) -> None:
    with pytest.raises(UnauthenticatedError, match="Bearer"):
        bearer_token((("authorization", value),))


def test_the_certificate_names_the_caller_by_common_name_else_alternative_name() -> None:
    assert certificate_identity({"x509_common_name": [b"acme"]}) == "acme"
    assert certificate_identity({"x509_subject_alternative_name": [b"spiffe://x/acme"]}) == (
        "spiffe://x/acme"
    )
    assert certificate_identity({"transport_security_type": [b"ssl"]}) is None


def test_a_known_token_names_its_caller_and_others_are_unauthenticated() -> None:
    auth = AuthSettings(
        required=True,
        callers={
            "acme": CallerSettings(token_sha256=(token_digest("t-acme"), token_digest("t-2"))),
            "bank": CallerSettings(token_sha256=(token_digest("t-bank"),)),
        },
    )
    guard = CallerGuard(Settings(auth=auth))
    assert guard.identify(bearer("t-acme")) == "acme"
    assert guard.identify(bearer("t-2")) == "acme"
    assert guard.identify(bearer("t-bank")) == "bank"
    with pytest.raises(UnauthenticatedError, match="unknown"):
        guard.identify(bearer("t-nobody"))
    with pytest.raises(UnauthenticatedError, match="certificate or a bearer token"):
        guard.identify(Call())


def test_without_required_auth_a_call_without_credentials_is_anonymous() -> None:
    auth = AuthSettings(callers={"acme": CallerSettings(token_sha256=(token_digest("t"),))})
    guard = CallerGuard(Settings(auth=auth))
    assert guard.identify(Call()) == ANONYMOUS
    with pytest.raises(UnauthenticatedError):
        guard.identify(bearer("wrong"))  # a token sent must still be right


def test_with_mutual_tls_the_certificate_names_the_caller_and_a_token_wins(
    tmp_path: Path,
) -> None:
    auth = AuthSettings(
        required=True, callers={"tenant": CallerSettings(token_sha256=(token_digest("t"),))}
    )
    guard = CallerGuard(_mtls(tmp_path, auth))
    assert guard.identify(cert("gateway")) == "gateway"
    token_and_cert = Call(metadata=bearer("t").metadata, peer=cert("gateway").peer)
    assert guard.identify(token_and_cert) == "tenant"


def test_a_caller_may_call_only_its_methods() -> None:
    auth = AuthSettings(
        required=True,
        callers={
            "labels": CallerSettings(token_sha256=(token_digest("t"),), methods=("ReportOutcome",))
        },
    )
    guard = CallerGuard(Settings(auth=auth))
    assert guard.admit("ReportOutcome", bearer("t")) is None
    with pytest.raises(PermissionDeniedError, match="'labels' may not call Score") as refused:
        guard.admit("Score", bearer("t"))
    assert refused.value.identity == "labels"


def test_each_caller_has_its_own_quota(tmp_path: Path) -> None:
    now = [0.0]
    auth = AuthSettings(
        callers={"a": CallerSettings(rate_per_s=1.0, burst=1.0, token_sha256=(token_digest("a"),))},
        default=CallerLimits(max_concurrent=1),
    )
    guard = CallerGuard(_mtls(tmp_path, auth), clock=lambda: now[0])
    quota = guard.admit("Score", bearer("a"))
    assert quota is not None
    quota.release()
    with pytest.raises(QuotaExceededError):
        guard.admit("Score", bearer("a"))  # its rate: refused although nothing is in flight
    # Unlisted certificate names get the default limits, each its own.
    one = guard.admit("Score", cert("one"))
    two = guard.admit("Score", cert("two"))
    assert one is not None and two is not None and one is not two
    with pytest.raises(QuotaExceededError):
        guard.admit("Score", cert("one"))
    one.release()
    assert guard.admit("Score", cert("one")) is one


def test_caller_errors_map_to_their_grpc_status() -> None:
    assert grpc_status_for(UnauthenticatedError("x")) == grpc.StatusCode.UNAUTHENTICATED
    assert grpc_status_for(PermissionDeniedError("x", "a")) == grpc.StatusCode.PERMISSION_DENIED
    assert grpc_status_for(QuotaExceededError("x", "a", 1.0)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )


def test_no_guard_is_needed_unless_something_asks_for_one(tmp_path: Path) -> None:
    assert not guard_needed(Settings())
    tls_only = ServerTlsSettings(cert_file=tmp_path / "c", key_file=tmp_path / "k")
    assert not guard_needed(Settings(server=ServerSettings(tls=tls_only)))
    assert guard_needed(Settings(auth=AuthSettings(default=CallerLimits(rate_per_s=5))))
    assert guard_needed(Settings(auth=AuthSettings(default=CallerLimits(methods=("Score",)))))
    assert guard_needed(_mtls(tmp_path, AuthSettings()))


def test_callers_come_from_the_file_too_and_may_not_be_named_twice(tmp_path: Path) -> None:
    path = tmp_path / "callers.json"
    path.write_text(json.dumps({"acme": {"token_sha256": [token_digest("t")], "rate_per_s": 3}}))
    auth = AuthSettings(required=True, callers_file=path)
    assert auth.all_callers()["acme"].rate_per_s == 3
    assert CallerGuard(Settings(auth=auth)).identify(bearer("t")) == "acme"
    with pytest.raises(ValidationError, match=r"already in auth\.callers"):
        AuthSettings(callers_file=path, callers={"acme": CallerSettings()})
    path.write_text("{not json")
    with pytest.raises(ValidationError, match="callers_file"):
        AuthSettings(callers_file=path)


@pytest.mark.parametrize(
    "bad",
    [
        {"token_sha256": ["abc"]},
        {"token_sha256": ["A" * 64]},
        {"methods": ["Delete"]},
        {"rate_per_s": 0},
        {"max_concurrent": 0},
        {"unknown": 1},
    ],
)
def test_caller_settings_are_validated(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        CallerSettings.model_validate(bad)


def test_required_auth_without_any_way_to_authenticate_is_refused() -> None:
    with pytest.raises(ValidationError, match="no caller can authenticate"):
        Settings(auth=AuthSettings(required=True))


def test_tls_settings_go_together(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="go together"):
        ServerTlsSettings(cert_file=tmp_path / "c")
    with pytest.raises(ValidationError, match=r"needs server\.tls\.cert_file"):
        ServerTlsSettings(client_ca_file=tmp_path / "ca")
