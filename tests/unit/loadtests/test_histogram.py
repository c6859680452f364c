"""The HDR-style histogram against exact nearest-rank percentiles."""

from __future__ import annotations

import math
import random

import pytest

from loadtests.histogram import Histogram, nearest_rank, percentile_of_sorted


def _exact(values: list[int], p: float) -> float:
    return percentile_of_sorted(sorted(values), p)


def test_small_values_are_exact() -> None:
    hist = Histogram()
    values = list(range(1, 1001))
    hist.record_many(values)
    for p in (0.0, 1.0, 50.0, 90.0, 99.0, 99.9, 100.0):
        assert hist.percentile(p) == _exact(values, p)
    assert (hist.count, hist.min, hist.max, hist.total) == (1000, 1, 1000, 500_500)
    assert hist.mean == 500.5


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_percentiles_are_within_a_tenth_of_a_percent_above_exact(seed: int) -> None:
    rng = random.Random(seed)
    values = [int(rng.lognormvariate(math.log(2000), 1.2)) for _ in range(20_000)]
    values += [rng.randrange(10_000_000, 60_000_000) for _ in range(20)]  # a far tail
    hist = Histogram()
    hist.record_many(values)
    for p in (50.0, 95.0, 99.0, 99.9, 99.99, 100.0):
        exact = _exact(values, p)
        got = hist.percentile(p)
        assert exact <= got <= exact * 1.001 + 1, (p, exact, got)
    assert hist.max == max(values) and hist.min == min(values)


def test_merge_equals_recording_everything_in_one() -> None:
    rng = random.Random(5)
    parts = [[rng.randrange(0, 5_000_000) for _ in range(3000)] for _ in range(3)]
    merged = Histogram()
    for part in parts:
        h = Histogram()
        h.record_many(part)
        merged.merge(h)
    whole = Histogram()
    whole.record_many(v for part in parts for v in part)
    assert merged == whole
    assert merged.percentile(99) == whole.percentile(99)


def test_merge_into_empty_and_of_empty() -> None:
    a, b = Histogram(), Histogram()
    b.record(7)
    a.merge(Histogram())
    assert a.count == 0
    a.merge(b)
    assert (a.count, a.min, a.max) == (1, 7, 7)


def test_round_trips_through_its_dict_form() -> None:
    hist = Histogram()
    hist.record_many([0, 5, 2047, 2048, 3000, 123_456, 9_999_999])
    again = Histogram.from_dict(hist.to_dict())
    assert again == hist
    assert again.percentile(50) == hist.percentile(50)


def test_from_dict_rejects_counts_that_do_not_add_up() -> None:
    data = Histogram().to_dict() | {"count": 3}
    with pytest.raises(ValueError, match="add up"):
        Histogram.from_dict(data)


def test_negative_values_are_clamped_to_zero() -> None:
    hist = Histogram()
    hist.record(-3)
    assert (hist.min, hist.max, hist.percentile(50)) == (0, 0, 0)


def test_share_at_or_below() -> None:
    hist = Histogram()
    hist.record_many([10, 20, 30, 40_000, 60_000])
    assert hist.share_at_or_below(30) == pytest.approx(0.6)
    assert hist.share_at_or_below(50_000) == pytest.approx(0.8)
    assert hist.share_at_or_below(10**9) == 1.0
    assert Histogram().share_at_or_below(5) == 0.0


def test_empty_histogram_answers_zero() -> None:
    hist = Histogram()
    assert (hist.percentile(99), hist.mean, hist.count) == (0, 0.0, 0)


@pytest.mark.parametrize(
    ("p", "n", "rank"), [(50, 10, 5), (99, 100, 99), (99.9, 1000, 999), (100, 7, 7), (0, 7, 1)]
)
def test_nearest_rank(p: float, n: int, rank: int) -> None:
    assert nearest_rank(p, n) == rank


def test_nearest_rank_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="no values"):
        nearest_rank(50, 0)
    with pytest.raises(ValueError, match="within"):
        nearest_rank(101, 5)
