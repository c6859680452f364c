"""The post-answer writer: writes wait for company, and a lookup ends the wait."""

from __future__ import annotations

import asyncio

from orchestrator.online_store import InMemoryOnlineStore, StoreWrite
from orchestrator.post_answer import PostAnswerWriter


def answer(key: str) -> StoreWrite:
    return StoreWrite("h:" + key, None, cache_key="c:" + key, cache_value=b"answer")


async def test_writes_wait_out_their_linger_without_a_release() -> None:
    store = InMemoryOnlineStore()
    async with PostAnswerWriter(store, linger_s=0.05) as writer:
        writer.submit(answer("a"))
        await asyncio.sleep(0.02)
        assert store.cache == {}  # still waiting for company
        async with asyncio.timeout(1.0):
            await writer.flush()
        assert store.cache == {"c:a": b"answer"}


async def test_a_release_sends_the_waiting_writes_on_the_next_turn() -> None:
    store = InMemoryOnlineStore()
    async with PostAnswerWriter(store, linger_s=60.0) as writer:
        assert not writer.release()  # nothing waits
        writer.submit(answer("a"))
        writer.submit(answer("b"))
        await asyncio.sleep(0)  # the writer takes the first and starts waiting
        assert writer.release()
        assert not writer.release()  # once
        await asyncio.sleep(0)  # what a releasing lookup does before its own request
        assert store.cache == {"c:a": b"answer", "c:b": b"answer"}  # one batch, 60 s early
        assert writer.stats.batches == 1
        await writer.flush()
        assert not writer.release()


async def test_writes_submitted_in_the_same_pass_are_released_too() -> None:
    store = InMemoryOnlineStore()
    async with PostAnswerWriter(store, linger_s=60.0) as writer:
        await asyncio.sleep(0)  # the writer waits for a first write
        writer.submit(answer("a"))  # the writer has not seen it yet
        assert writer.release()
        await asyncio.sleep(0)
        assert store.cache == {"c:a": b"answer"}
        writer.submit(answer("b"))  # the next batch waits for company again
        await asyncio.sleep(0.01)
        assert "c:b" not in store.cache
        assert writer.release()
        await asyncio.sleep(0)
        assert "c:b" in store.cache


async def test_without_a_linger_there_is_nothing_to_release() -> None:
    store = InMemoryOnlineStore()
    async with PostAnswerWriter(store, linger_s=0.0) as writer:
        writer.submit(answer("a"))
        await asyncio.sleep(0)
        assert not writer.release()
        await writer.flush()
        assert store.cache == {"c:a": b"answer"}
