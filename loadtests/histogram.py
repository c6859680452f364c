"""A mergeable latency histogram in the style of HdrHistogram, and percentile math.

Values are non-negative integers (microseconds here). Each power-of-two range above
``2 * SUB_BUCKETS`` is cut into ``SUB_BUCKETS`` equal buckets, so every recorded value is kept to
within ``1 / SUB_BUCKETS`` (0.1%) of itself while memory grows only with the number of distinct
buckets touched. Counts live in a sparse dict, so histograms from several generator processes
merge by adding counts, and serialise to JSON as they are.

Percentiles use the nearest-rank definition: the ``p``-th percentile is the smallest recorded
value ``v`` such that at least ``ceil(p / 100 * n)`` values are ``<= v``. The histogram answers
with the highest value its bucket could hold (never under-reports latency) capped at the true
maximum, which it tracks exactly, as it does the minimum and the sum.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Final

__all__ = ["SUB_BUCKETS", "Histogram", "nearest_rank", "percentile_of_sorted"]

SUB_BUCKETS: Final = 1024
_LINEAR_LIMIT: Final = 2 * SUB_BUCKETS  # values below this are stored exactly
_SUB_BITS: Final = SUB_BUCKETS.bit_length() - 1  # 10


def nearest_rank(p: float, n: int) -> int:
    """1-based rank of the ``p``-th percentile among ``n`` values (nearest-rank definition)."""
    if n < 1:
        raise ValueError("no values")
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile must be within 0..100, got {p}")
    return max(1, math.ceil(p / 100.0 * n - 1e-9))


def percentile_of_sorted(values: list[int] | list[float], p: float) -> float:
    """Exact nearest-rank percentile of an ascending list (the reference the histogram meets)."""
    return float(values[nearest_rank(p, len(values)) - 1])


def _bucket_key(value: int) -> int:
    """Bucket index of ``value``: exact below 2048, then 1024 buckets per power of two."""
    if value < _LINEAR_LIMIT:
        return value
    shift = value.bit_length() - (_SUB_BITS + 1)
    return (shift << _SUB_BITS) + (value >> shift) + SUB_BUCKETS


def _bucket_high(key: int) -> int:
    """The largest value that falls into bucket ``key``."""
    if key < _LINEAR_LIMIT:
        return key
    offset = key - SUB_BUCKETS  # (shift << 10) + sub, with sub in [1024, 2048)
    shift = (offset >> _SUB_BITS) - 1
    sub = offset - (shift << _SUB_BITS)
    return ((sub + 1) << shift) - 1


class Histogram:
    """Counts of integer values in 0.1%-wide buckets; exact count, sum, min and max."""

    __slots__ = ("_counts", "count", "max", "min", "total")

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}
        self.count = 0
        self.total = 0
        self.min = 0
        self.max = 0

    def record(self, value: int) -> None:
        """Add one value (negative values are clamped to 0: clocks can step by a microsecond)."""
        v = value if value > 0 else 0
        key = _bucket_key(v)
        self._counts[key] = self._counts.get(key, 0) + 1
        if self.count == 0 or v < self.min:
            self.min = v
        if v > self.max:
            self.max = v
        self.count += 1
        self.total += v

    def record_many(self, values: Iterable[int]) -> None:
        """Add every value of ``values``."""
        for value in values:
            self.record(value)

    def merge(self, other: Histogram) -> None:
        """Add ``other``'s counts to this histogram."""
        if other.count == 0:
            return
        for key, n in other._counts.items():
            self._counts[key] = self._counts.get(key, 0) + n
        self.min = other.min if self.count == 0 else min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.count += other.count
        self.total += other.total

    @property
    def mean(self) -> float:
        """Arithmetic mean (0.0 when empty)."""
        return self.total / self.count if self.count else 0.0

    def percentile(self, p: float) -> int:
        """Nearest-rank ``p``-th percentile, within 0.1% above the exact one; 0 when empty."""
        if self.count == 0:
            return 0
        rank = nearest_rank(p, self.count)
        seen = 0
        for key in sorted(self._counts):
            seen += self._counts[key]
            if seen >= rank:
                return max(self.min, min(_bucket_high(key), self.max))
        return self.max  # unreachable: the counts add up to self.count

    def share_at_or_below(self, limit: int) -> float:
        """Share of values ``<= limit`` (exact when ``limit`` is below 2048, else to 0.1%)."""
        if self.count == 0:
            return 0.0
        if limit >= self.max:
            return 1.0
        below = sum(n for key, n in self._counts.items() if _bucket_high(key) <= limit)
        return below / self.count

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form; :meth:`from_dict` restores it exactly."""
        return {
            "count": self.count,
            "total": self.total,
            "min": self.min,
            "max": self.max,
            "buckets": {str(k): n for k, n in sorted(self._counts.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Histogram:
        """Inverse of :meth:`to_dict`."""
        hist = cls()
        buckets = data.get("buckets", {})
        if not isinstance(buckets, Mapping):
            raise ValueError("histogram 'buckets' must be a mapping")
        hist._counts = {int(k): int(n) for k, n in buckets.items()}
        hist.count = _as_int(data, "count")
        hist.total = _as_int(data, "total")
        hist.min = _as_int(data, "min")
        hist.max = _as_int(data, "max")
        if sum(hist._counts.values()) != hist.count:
            raise ValueError("histogram buckets do not add up to its count")
        return hist

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Histogram):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"Histogram(count={self.count}, min={self.min}, max={self.max})"


def _as_int(data: Mapping[str, object], key: str) -> int:
    value = data.get(key)
    if not isinstance(value, int):
        raise ValueError(f"histogram {key!r} must be an integer")
    return value
