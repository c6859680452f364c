"""The post-answer writer: writes wait for company, then go out in one batch."""

from __future__ import annotations

import asyncio

from orchestrator.online_store import InMemoryOnlineStore, StoreWrite
from orchestrator.post_answer import PostAnswerWriter


def answer(key: str) -> StoreWrite:
    return StoreWrite("h:" + key, None, cache_key="c:" + key, cache_value=b"answer")


async def test_writes_wait_for_company_then_go_out_together() -> None:
    store = InMemoryOnlineStore()
    async with PostAnswerWriter(store, linger_s=0.5) as writer:
        writer.submit(answer("a"))
        await asyncio.sleep(0.02)
        writer.submit(answer("b"))
        assert store.cache == {}  # still waiting for company
        async with asyncio.timeout(1.0):
            await writer.flush()
        assert store.cache == {"c:a": b"answer", "c:b": b"answer"}
        assert writer.stats.batches == 1
