"""How fast this machine runs a fixed piece of an answer's work, this minute.

On a shared host the same code can take several times as long from one hour to the next: the
host runs other work beside this VM (steal, which ``/proc/stat`` counts) and, beyond that, leaves
the caches and cores it lends busier or colder (which nothing counts). ``cascade loadtest``
times :func:`features_workload` back to back before its first step and after its last, and the
report prints both beside its tables, so two reports of one commit can be told apart by the
machine: the code did not change between them, only the time the same work took.

The workload is what the orchestrator runs for every Score call: a 64-entry stored card history
decoded and the stage-1 features computed from it. It needs no model file and no server.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Final

from cascade.features import encode_history_entry, history_entry, screening_features
from cascade.transaction import Channel, Transaction
from orchestrator.online_store import decode_history

WORKLOAD: Final = "stage-1 features of a 64-entry history, back to back"
_NOW_MS: Final = 1_767_225_600_000


def history_fixture(n: int, now_ms: int) -> tuple[Transaction, list[bytes]]:
    """A transaction and the ``n`` stored history entries of its card, newest first."""

    def tx(i: int) -> Transaction:
        return Transaction(
            transaction_id=f"machine-speed-{i:06d}",
            card_id="card-machine-speed",
            merchant_id=f"merchant-{i % 7}",
            merchant_category=("5411", "5812", "4829", "5999")[i % 4],
            amount_minor=1_000 + 37 * i,
            currency=("USD", "EUR")[i % 2],
            country=("US", "DE", "GB")[i % 3],
            channel=Channel(1 + i % 6),
            timestamp_ms=now_ms - i * 3_600_000,
            device_id=f"device-{i % 3}",
            ip_country="US",
        )

    stored = [encode_history_entry(history_entry(tx(i))) for i in range(1, n + 1)]
    return tx(0), stored


def features_workload() -> Callable[[], object]:
    """One call of it: decode a 64-entry history and compute the stage-1 features."""
    transaction, stored = history_fixture(64, now_ms=_NOW_MS)

    def features() -> object:
        return screening_features(transaction, decode_history(stored))

    return features


def machine_speed(*, runs: int = 300, warmup: int = 30) -> dict[str, float]:
    """The workload ``runs`` times back to back in this thread (after ``warmup`` untimed runs):
    the median wall time and the mean CPU time per run, in microseconds. About 20-100 ms."""
    if runs < 1 or warmup < 0:
        raise ValueError("need runs >= 1 and warmup >= 0")
    run = features_workload()
    walls: list[float] = []
    cpu_s = 0.0
    for i in range(warmup + runs):
        cpu0 = time.thread_time()
        wall0 = time.perf_counter()
        run()
        wall = time.perf_counter() - wall0
        if i >= warmup:
            walls.append(wall)
            cpu_s += time.thread_time() - cpu0
    return {
        "wall_p50_us": round(statistics.median(walls) * 1e6, 1),
        "cpu_mean_us": round(cpu_s / runs * 1e6, 1),
        "runs": runs,
    }
