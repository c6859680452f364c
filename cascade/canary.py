"""The canary split: which cards the candidate scores, by a hash of the card id.

The orchestrator passes the card's token (:mod:`cascade.pseudonym`), not the id it was sent:
the split is stable for as long as the pseudonym key is, and a key rotation reshuffles it.

Pure and stable across processes and restarts (BLAKE2b, not Python's salted ``hash``), so every
orchestrator process sends a card to the same side, every time, for as long as the share stays:
a card's answers, cache entries and history are never split between versions within a rollout.
Raising the share only adds cards (a card in at 5% is still in at 20%).
"""

from __future__ import annotations

import hashlib
from typing import Final

__all__ = ["card_bucket", "in_canary"]

_SPAN: Final = float(1 << 64)


def card_bucket(card_id: str) -> float:
    """The card's place in [0, 1): the first 64 bits of BLAKE2b(card id) over 2^64."""
    digest = hashlib.blake2b(card_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SPAN


def in_canary(card_id: str, share: float) -> bool:
    """Whether the candidate scores ``card_id`` when it gets ``share`` (0..1) of the cards."""
    return share > 0.0 and card_bucket(card_id) < share
