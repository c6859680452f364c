"""Backfilling card histories into a target through its own ``ScoreBatch`` RPC (I/O).

The batches come from :func:`loadtests.history.backfill_batches` (whole cards, time order, at most
500 transactions each); they are sent one at a time, in order, the way ``cascade up --sample``
sends its sample's history (:func:`devstack.cli.score_samples`). The target writes history after
answering, so the backfill ends with a short pause for those writes to land.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, Final

from cascade.transaction import Transaction
from cascade.v1 import scoring_pb2
from cascade.wire import to_wire
from loadtests.client import ScoringClient
from loadtests.replay import tagged

__all__ = ["backfill"]

_BATCH_TIMEOUT_S: Final = 30.0
_SETTLE_S: Final = 0.5


async def backfill(
    client: ScoringClient, batches: Sequence[Sequence[Transaction]], *, nonce: str
) -> dict[str, Any]:
    """Send ``batches`` with ``ScoreBatch`` (ids tagged with ``nonce``); what was sent, as a dict.

    A failed batch raises: a load measured on half-backfilled cards would not be what it claims.
    """
    started = time.monotonic()
    sent = 0
    reasons: Counter[str] = Counter()
    cards: set[str] = set()
    for batch in batches:
        request = scoring_pb2.ScoreBatchRequest(
            transactions=[to_wire(tagged(tx, nonce)) for tx in batch]
        )
        reply = await client.score_batch(request, _BATCH_TIMEOUT_S)
        sent += len(batch)
        cards.update(tx.card_id for tx in batch)
        for result in reply.results:
            reasons.update(
                scoring_pb2.Reason.Name(r).removeprefix("REASON_") for r in result.reasons
            )
    await asyncio.sleep(_SETTLE_S if batches else 0)
    return {
        "cards": len(cards),
        "transactions": sent,
        "batches": len(batches),
        "seconds": round(time.monotonic() - started, 2),
        "reasons": dict(sorted(reasons.items())),
    }
