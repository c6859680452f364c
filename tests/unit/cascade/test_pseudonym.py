"""Card and device tokens: stable under one key, different under another, no secret shown, and
the rotation's read order (current key first, then the previous one) in the store's twin."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import secrets
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from cascade.errors import ConfigurationError
from cascade.features import encode_history_entry, history_entry
from cascade.pseudonym import (
    TOKEN_PATTERN,
    Pseudonymizer,
    PseudonymKey,
    from_settings,
    new_key_file,
)
from cascade.settings import PseudonymSettings, Settings
from cascade.transaction import Transaction
from orchestrator.online_store import InMemoryOnlineStore, StoreWrite, card_history_key
from tests.conftest import make_transaction


def key(key_id: str = "k1") -> PseudonymKey:
    return PseudonymKey(key_id, secrets.token_hex(32).encode())


def test_a_token_is_stable_under_one_key_and_names_its_version() -> None:
    k = key()
    a, b = Pseudonymizer(k), Pseudonymizer(k)
    token = a.card("card-42")
    assert token == b.card("card-42")
    assert TOKEN_PATTERN.fullmatch(token)
    assert token.startswith("k1.")
    assert "card-42" not in token
    assert a.card("card-43") != token


def test_tokens_are_the_documented_hmac_whatever_computes_them() -> None:
    # Stored histories are keyed by these tokens: a change of value would orphan every one.
    current, previous = PseudonymKey("k2", b"c" * 40), PseudonymKey("k1", b"p" * 200)
    p = Pseudonymizer(current, previous)

    def expected(k: PseudonymKey, message: bytes) -> str:
        return f"{k.key_id}.{hmac.digest(k.secret, message, 'sha256')[:16].hex()}"

    for _ in range(2):  # the keyed state is copied, never used up
        assert p.card("card-42") == expected(current, b"card\x1fcard-42")
        assert p.device("dév-7") == expected(current, "device\x1fdév-7".encode())
        assert p.previous_card("card-42") == expected(previous, b"card\x1fcard-42")
    assert p.card("card-42") == "k2.a1cf6a230d73a5f71ba05148d0797c44"


def test_another_key_or_version_gives_other_tokens() -> None:
    k = key()
    other_secret = Pseudonymizer(PseudonymKey("k1", secrets.token_hex(32).encode()))
    other_version = Pseudonymizer(PseudonymKey("k2", k.secret))
    token = Pseudonymizer(k).card("card-42")
    assert other_secret.card("card-42") != token
    assert other_version.card("card-42") != token
    # The version alone must not be all that differs: the digest is keyed, not the prefix.
    assert other_secret.card("card-42").split(".")[1] != token.split(".")[1]


def test_cards_and_devices_with_one_id_get_different_tokens_and_empty_stays_empty() -> None:
    p = Pseudonymizer(key())
    assert p.card("x-1") != p.device("x-1")
    assert p.device("") == ""
    assert TOKEN_PATTERN.fullmatch(p.device("dev-1"))


def test_transaction_carries_tokens_and_the_previous_token_only_while_rotating() -> None:
    old, new = key("k1"), key("k2")
    tx = make_transaction(card_id="card-42", device_id="dev-1")
    plain = Pseudonymizer(new).transaction(tx)
    assert (plain.card_id, plain.device_id) == (
        Pseudonymizer(new).card("card-42"),
        Pseudonymizer(new).device("dev-1"),
    )
    assert plain.previous_card_id == ""
    # Every other field carried over as it was (one per field of Transaction, none forgotten).
    others = [f.name for f in dataclasses.fields(Transaction)]
    others = [n for n in others if n not in ("card_id", "device_id", "previous_card_id")]
    assert len(others) == 9
    assert all(getattr(plain, n) == getattr(tx, n) for n in others)
    rotating = Pseudonymizer(new, old)
    assert rotating.rotating and not Pseudonymizer(new).rotating
    moved = rotating.transaction(tx)
    assert moved.card_id == plain.card_id
    assert moved.previous_card_id == Pseudonymizer(old).card("card-42")
    assert rotating.card_tokens("card-42") == (moved.card_id, moved.previous_card_id)


def test_no_secret_in_repr_or_settings_dump() -> None:
    secret = secrets.token_hex(32)
    settings = Settings(pseudonym=PseudonymSettings(key=SecretStr(secret)))
    p = from_settings(settings.pseudonym)
    for text in (repr(settings), str(settings), settings.model_dump_json(), repr(p), str(p)):
        assert secret not in text
    assert secret not in repr(PseudonymKey("k1", secret.encode()))


def test_settings_refuse_inconsistent_keys(tmp_path: Path) -> None:
    k = "a" * 40
    with pytest.raises(ValidationError):
        PseudonymSettings(key=SecretStr(k), key_file=tmp_path / "k")
    with pytest.raises(ValidationError):
        PseudonymSettings(key=SecretStr(k), previous_key=SecretStr(k))  # no previous id
    with pytest.raises(ValidationError):
        PseudonymSettings(key=SecretStr(k), previous_key=SecretStr(k), previous_key_id="k1")
    with pytest.raises(ValidationError):
        PseudonymSettings(key_id="k.1")
    assert PseudonymSettings(key=SecretStr("")).key is None


def test_no_key_short_key_or_missing_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="no pseudonym key"):
        from_settings(PseudonymSettings())
    with pytest.raises(ConfigurationError, match="at least 32"):
        from_settings(PseudonymSettings(key=SecretStr("short")))
    with pytest.raises(ConfigurationError, match="cannot read"):
        from_settings(PseudonymSettings(key_file=tmp_path / "absent"))


def test_key_file_is_made_once_owner_only_and_read_like_the_value(tmp_path: Path) -> None:
    path = new_key_file(tmp_path / "run" / "pseudonym.key")
    first = path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600
    assert new_key_file(path).read_text() == first  # kept: the run dir's histories stay readable
    from_file = from_settings(PseudonymSettings(key_file=path))
    from_value = from_settings(PseudonymSettings(key=SecretStr(first.strip())))
    assert from_file.card("card-42") == from_value.card("card-42")


def test_rotation_reads_current_then_previous_and_the_write_moves_the_history() -> None:
    old, new = key("k1"), key("k2")
    before, after = Pseudonymizer(old), Pseudonymizer(new, old)
    store = InMemoryOnlineStore()
    first = before.transaction(make_transaction(transaction_id="tx-1"))
    old_key = card_history_key(first.card_id, "fs")
    entry = encode_history_entry(history_entry(first))
    asyncio.run(store.write([StoreWrite(old_key, entry)]))

    second = after.transaction(
        make_transaction(transaction_id="tx-2", timestamp_ms=first.timestamp_ms + 1)
    )
    new_key = card_history_key(second.card_id, "fs")
    assert card_history_key(second.previous_card_id, "fs") == old_key
    (found,) = asyncio.run(store.lookup([("out:x", new_key)], 1.0, [old_key]))
    assert found.history == [entry]  # nothing under the new token yet: the previous one's
    (without,) = asyncio.run(store.lookup([("out:x", new_key)], 1.0))
    assert without.history == []

    second_entry = encode_history_entry(history_entry(second))
    asyncio.run(store.write([StoreWrite(new_key, second_entry, previous_history_key=old_key)]))
    assert store.histories[new_key] == [second_entry, entry]
    (moved,) = asyncio.run(store.lookup([("out:x", new_key)], 1.0, [old_key]))
    assert moved.history == [second_entry, entry]  # the current key wins once it exists
