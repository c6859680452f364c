"""Card and device ids as keyed hashes: what the cascade keeps instead of the ids it is sent.

A token is ``<key id>.<first 128 bits of HMAC-SHA256(key, kind 0x1f id), hex>``, for example
``k1.3f2a...`` (35 characters with a two-character key id). The orchestrator replaces
``card_id`` and ``device_id`` with their tokens right after validation, so everything after that
point (Redis keys and history entries, the decision log, span attributes, log lines, the canary
split) only ever holds tokens: one HMAC per id per request (1-2 us each back to back), nothing cached.

* The key id is part of every token, so a new key names new Redis keys (as model versions do in
  cache keys): nothing written under the old key is ever mistaken for the new one's.
* Equal ids give equal tokens under one key, so the features (a device seen before on this card,
  the same device as the last transaction) read exactly what they read from raw ids; an empty
  device id (unknown) stays empty.
* ``kind`` (``card`` / ``device``) keeps a card and a device that share an id string apart.
* While a key is rotated, :attr:`Pseudonymizer.rotating` is true and :meth:`Pseudonymizer.previous_card`
  gives the card's token under the previous key: the orchestrator reads that history when the
  current key has none yet and copies it under the current token with its next write
  (:mod:`orchestrator.online_store`), so histories migrate as cards transact.

Keys come from :class:`cascade.settings.PseudonymSettings` (a value or a file); there is no
default key: :func:`from_settings` raises :class:`~cascade.errors.ConfigurationError` when none is
configured, so a deployment cannot quietly hash with a key everyone knows.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
import re
import secrets
from pathlib import Path
from typing import Final

from cascade.errors import ConfigurationError
from cascade.settings import PseudonymSettings
from cascade.transaction import Transaction

__all__ = [
    "MIN_KEY_CHARS",
    "TOKEN_PATTERN",
    "PseudonymKey",
    "Pseudonymizer",
    "from_settings",
    "new_key_file",
]

MIN_KEY_CHARS: Final = 32
"""A key shorter than this is refused (32 random hex characters are 128 bits)."""
TOKEN_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{1,16}\.[0-9a-f]{32}")
"""What every token looks like."""
_CARD: Final = b"card\x1f"
_DEVICE: Final = b"device\x1f"
_DIGEST_BYTES: Final = 16


@dataclasses.dataclass(frozen=True, slots=True)
class PseudonymKey:
    """One HMAC key and its version; the secret never appears in ``repr``."""

    key_id: str
    secret: bytes = dataclasses.field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) < MIN_KEY_CHARS:
            raise ConfigurationError(
                f"pseudonym key {self.key_id!r} is {len(self.secret)} bytes; "
                f"at least {MIN_KEY_CHARS} needed"
            )


def _token(keyed: hmac.HMAC, prefix: str, message: bytes) -> str:
    """``prefix`` and the first 128 bits of ``keyed``'s HMAC of ``message``, hex."""
    mac = keyed.copy()
    mac.update(message)
    return prefix + mac.digest()[:_DIGEST_BYTES].hex()


class Pseudonymizer:
    """Tokens for card and device ids under the current key (and the previous one while a
    rotation is under way)."""

    __slots__ = (
        "_current",
        "_current_mac",
        "_prefix",
        "_previous",
        "_previous_mac",
        "_previous_prefix",
    )

    def __init__(self, current: PseudonymKey, previous: PseudonymKey | None = None) -> None:
        if previous is not None and previous.key_id == current.key_id:
            raise ConfigurationError("the previous pseudonym key needs an id of its own")
        self._current = current
        self._previous = previous
        self._prefix = current.key_id + "."
        self._previous_prefix = previous.key_id + "." if previous is not None else ""
        # Each key's HMAC with the key already absorbed; a token copies it and adds the id.
        # One-shot hmac.digest sets OpenSSL's HMAC up on every call: card() took 1.9 against
        # 1.5 us back to back, and 66 against 40 us with the caches evicted before each call
        # (the orchestrator's profile saw 25 us per one-shot call).
        self._current_mac = hmac.new(current.secret, digestmod="sha256")
        self._previous_mac = (
            hmac.new(previous.secret, digestmod="sha256") if previous is not None else None
        )

    def __repr__(self) -> str:
        previous = self._previous.key_id if self._previous is not None else None
        return f"Pseudonymizer(key_id={self._current.key_id!r}, previous_key_id={previous!r})"

    @property
    def key_id(self) -> str:
        """The current key's version (every token starts with it)."""
        return self._current.key_id

    @property
    def rotating(self) -> bool:
        """Whether a previous key is configured (histories are still read under it)."""
        return self._previous is not None

    def card(self, card_id: str) -> str:
        """The card's token under the current key."""
        return _token(self._current_mac, self._prefix, _CARD + card_id.encode())

    def device(self, device_id: str) -> str:
        """The device's token under the current key; an empty id (unknown) stays empty."""
        if not device_id:
            return ""
        return _token(self._current_mac, self._prefix, _DEVICE + device_id.encode())

    def previous_card(self, card_id: str) -> str:
        """The card's token under the previous key; empty when no rotation is under way."""
        if self._previous_mac is None:
            return ""
        return _token(self._previous_mac, self._previous_prefix, _CARD + card_id.encode())

    def card_tokens(self, card_id: str) -> tuple[str, ...]:
        """Every token the card may be stored under: current first, then the previous one."""
        previous = self.previous_card(card_id)
        return (self.card(card_id), previous) if previous else (self.card(card_id),)

    def transaction(self, tx: Transaction) -> Transaction:
        """``tx`` with its card and device ids replaced by their tokens (and, while rotating,
        the card's previous token in ``previous_card_id``)."""
        # The constructor, not dataclasses.replace: a third of the cost, on every request.
        # (tests/unit/cascade/test_pseudonym.py checks every other field is carried over.)
        return Transaction(
            transaction_id=tx.transaction_id,
            card_id=self.card(tx.card_id),
            merchant_id=tx.merchant_id,
            merchant_category=tx.merchant_category,
            amount_minor=tx.amount_minor,
            currency=tx.currency,
            country=tx.country,
            channel=tx.channel,
            timestamp_ms=tx.timestamp_ms,
            device_id=self.device(tx.device_id),
            ip_country=tx.ip_country,
            previous_card_id=self.previous_card(tx.card_id) if self._previous is not None else "",
        )


def _read_key(value: str | None, path: Path | None, what: str) -> bytes | None:
    if value is not None:
        return value.strip().encode()
    if path is None:
        return None
    try:
        return path.read_text().strip().encode()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the {what} file {path}: {exc.strerror}") from None


def from_settings(settings: PseudonymSettings) -> Pseudonymizer:
    """The pseudonymizer the settings configure; ``ConfigurationError`` when there is no key (or
    a key is too short, or its file unreadable): ids are never kept unhashed, nor hashed with a
    key nobody chose."""
    current = _read_key(
        settings.key.get_secret_value() if settings.key is not None else None,
        settings.key_file,
        "pseudonym key",
    )
    if current is None:
        raise ConfigurationError(
            "no pseudonym key: set CASCADE_PSEUDONYM__KEY or CASCADE_PSEUDONYM__KEY_FILE "
            "(`cascade up` makes one per run dir; deploy/README.md says how to make and rotate "
            "one)"
        )
    previous = _read_key(
        settings.previous_key.get_secret_value() if settings.previous_key is not None else None,
        settings.previous_key_file,
        "previous pseudonym key",
    )
    return Pseudonymizer(
        PseudonymKey(settings.key_id, current),
        PseudonymKey(settings.previous_key_id or "", previous) if previous is not None else None,
    )


def new_key_file(path: Path) -> Path:
    """Write a fresh random key (64 hex characters) to ``path``, readable by its owner only,
    unless a file is already there (a run dir keeps its key, so its histories stay readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(secrets.token_hex(32) + "\n")
    return path
