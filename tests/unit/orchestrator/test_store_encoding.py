"""What goes to Redis and what comes back: RESP commands, and stored histories read whole."""

from __future__ import annotations

import logging

import pytest

from cascade.features import HistoryEntry, encode_history_entry
from cascade.transaction import Channel
from orchestrator.online_store import decode_history
from orchestrator.redis_pipeline import encode_commands


def test_commands_are_resp_arrays_of_bulk_strings() -> None:
    payload = encode_commands([(b"LRANGE", "hist:kört", 0, -1), [b"GET", b"\x00\r\n\xff"]])

    assert payload == (
        b"*4\r\n$6\r\nLRANGE\r\n$10\r\nhist:k\xc3\xb6rt\r\n$1\r\n0\r\n$2\r\n-1\r\n"
        b"*2\r\n$3\r\nGET\r\n$4\r\n\x00\r\n\xff\r\n"
    )


def test_no_commands_is_nothing_to_write() -> None:
    assert encode_commands([]) == b""


def test_a_stored_history_skips_and_counts_the_entries_it_cannot_read(
    caplog: pytest.LogCaptureFixture,
) -> None:
    entries = [
        HistoryEntry(
            f"tx-{i}", 1_750_000_000_000 - i, 100 * i, "EUR", "m-1", "5411", "DE", Channel.ECOMMERCE
        )
        for i in range(3)
    ]
    raw = [encode_history_entry(e) for e in entries]
    raw[1:1] = [b"", b"\x07" + raw[0][1:]]

    with caplog.at_level(logging.WARNING, logger="orchestrator.online_store"):
        history = decode_history(raw)

    assert history == entries
    assert "skipping 2 unreadable card-history entries" in caplog.text
