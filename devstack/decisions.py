"""``cascade decisions``: read the decision log (the JetStream stream ``DECISIONS``), filter it,
follow it, and export it as JSON Lines or Parquet.

Reading uses an ordered push consumer (ephemeral, no state left on the server) on
``<prefix>.<policy>`` or ``<prefix>.>``, starting at ``--since`` on the server's side; every other
filter is applied here (:class:`devstack.decision_rows.DecisionFilter`). Without ``--follow`` it
stops at the last record that was in the stream when it started.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final

from nats.js.api import ConsumerConfig, DeliverPolicy

from cascade.decision_record import decode_decision
from cascade.errors import translate_jetstream_errors
from cascade.nats_connection import connect_nats
from devstack.decision_rows import ROW_FIELDS, DecisionFilter, decision_row

__all__ = ["parquet_schema", "read_decision_rows", "table_line", "write_jsonl", "write_parquet"]

logger = logging.getLogger(__name__)

_IDLE_TIMEOUT_S: Final = 2.0


async def read_decision_rows(
    url: str,
    *,
    stream: str = "DECISIONS",
    subject_prefix: str = "decisions",
    where: DecisionFilter | None = None,
    follow: bool = False,
    idle_timeout_s: float = _IDLE_TIMEOUT_S,
) -> AsyncIterator[dict[str, object]]:
    """The stream's records as rows (:func:`devstack.decision_rows.decision_row`) that pass
    ``where``, oldest first. Without ``follow`` it ends after the last record present at the
    start (or after ``idle_timeout_s`` without one); with it, it waits for more for ever.

    Raises ``DependencyError`` (the decision log's) when NATS or the stream cannot be read."""
    where = where or DecisionFilter()
    subject = (
        f"{subject_prefix}.{where.policy_version}"
        if where.policy_version
        else f"{subject_prefix}.>"
    )
    config = ConsumerConfig()
    deliver = DeliverPolicy.ALL
    if where.since_ms is not None:
        deliver = DeliverPolicy.BY_START_TIME
        config.opt_start_time = datetime.fromtimestamp(where.since_ms / 1000, tz=UTC)
    with translate_jetstream_errors():
        nc = await connect_nats(url, name="cascade-decisions-reader")
    try:
        js = nc.jetstream()
        with translate_jetstream_errors():
            sub = await js.subscribe(
                subject,
                stream=stream,
                ordered_consumer=True,
                deliver_policy=deliver,
                config=config,
            )
            # What the filter matches now (a push consumer's own num_pending drops as soon as
            # it delivers, so it cannot tell an empty stream from a fast one).
            info = await js.stream_info(stream, subjects_filter=subject)
        if not follow and not sum((info.state.subjects or {}).values()):
            return
        undecodable = 0
        while True:
            try:
                msg = await sub.next_msg(timeout=None if follow else idle_timeout_s)
            except TimeoutError:
                return
            seq = msg.metadata.sequence.stream
            try:
                record = decode_decision(msg.data)
            except ValueError:
                undecodable += 1
                logger.warning("skipping undecodable record at stream seq %d", seq)
                continue
            row = decision_row(record, seq)
            if where.matches(row):
                yield row
            if not follow and msg.metadata.num_pending == 0:
                return
    finally:
        await nc.close()


def write_jsonl(rows: Iterable[dict[str, object]], out: IO[str]) -> int:
    """One compact JSON object per line; returns how many were written."""
    n = 0
    for row in rows:
        out.write(json.dumps(row, separators=(",", ":")) + "\n")
        n += 1
    return n


def parquet_schema() -> Any:
    """The Parquet columns (:data:`devstack.decision_rows.ROW_FIELDS`, in order)."""
    import pyarrow as pa

    string, i64, f32 = pa.string(), pa.int64(), pa.float32()
    types = {
        "stream_seq": i64,
        "amount_minor": i64,
        "timestamp_ms": i64,
        "score": f32,
        "stage1_score": f32,
        "stage2_score": f32,
        "degraded": pa.bool_(),
        "escalated": pa.bool_(),
        "reasons": pa.list_(string),
        "total_us": i64,
        "redis_us": i64,
        "features_us": i64,
        "stage1_us": i64,
        "stage2_us": i64,
        "budget_us": i64,
        "deadline_left_us": i64,
        "decided_at_ms": i64,
        "features": pa.list_(f32),
    }
    return pa.schema([(name, types.get(name, string)) for name in ROW_FIELDS])


def write_parquet(rows: list[dict[str, object]], path: Path) -> int:
    """Write ``rows`` as one Parquet file (needs pyarrow: the ``audit`` extra)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise SystemExit(
            "Parquet needs pyarrow: pip install 'fraud-cascade[audit]' (scripts/setup --dev has it)"
        ) from None
    table = pa.Table.from_pylist(rows, schema=parquet_schema())
    pq.write_table(table, path)
    return len(rows)


def table_line(row: dict[str, object]) -> str:
    """A one-line summary for the terminal."""
    decided = datetime.fromtimestamp(float(row["decided_at_ms"]) / 1000, tz=UTC)  # type: ignore[arg-type]
    stamp = decided.strftime("%Y-%m-%dT%H:%M:%S.") + f"{decided.microsecond // 1000:03d}Z"
    stage2 = row["stage2_score"]
    stage2_text = "" if stage2 is None else f"{float(stage2):.4f}"  # type: ignore[arg-type]
    reasons = ",".join(row["reasons"])  # type: ignore[arg-type]
    versions = f"{row['policy_version']}/{row['stage1_version']}/{row['stage2_version']}"
    return (
        f"{row['stream_seq']:>8} {stamp} {row['transaction_id']:<24} {row['card_id']:<16} "
        f"{row['decision']:<8} {float(row['score']):6.4f} {stage2_text:>6} "  # type: ignore[arg-type]
        f"{row['decided_by']:<7} {versions} {row['trace_id'] or '-'} {reasons}"
    )
