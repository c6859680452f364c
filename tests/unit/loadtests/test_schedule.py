"""Arrival schedules: counts, spacing, Poisson statistics, splitting over processes, bounds."""

from __future__ import annotations

import numpy as np
import pytest

from loadtests.schedule import Arrivals, ScheduleSpec, schedule_offsets, split_count, window_s


def test_constant_arrivals_are_evenly_spaced_and_exactly_rate_times_duration() -> None:
    offsets = schedule_offsets(ScheduleSpec(200.0, 2.0, arrivals=Arrivals.CONSTANT))
    assert len(offsets) == 400
    assert offsets[0] == 0.0
    assert np.allclose(np.diff(offsets), 1 / 200)
    assert offsets[-1] < 2.0


def test_constant_parts_interleave_into_the_whole_schedule() -> None:
    spec = ScheduleSpec(300.0, 1.0, arrivals=Arrivals.CONSTANT)
    whole = schedule_offsets(spec)
    parts = [schedule_offsets(spec, parts=3, index=k) for k in range(3)]
    assert [len(p) for p in parts] == [100, 100, 100]
    assert np.allclose(np.sort(np.concatenate(parts)), whole)
    assert np.allclose(np.diff(parts[1]), 3 / 300)  # each part is evenly spaced at rate / 3


def test_poisson_arrivals_have_the_rate_and_exponential_gaps() -> None:
    offsets = schedule_offsets(ScheduleSpec(1000.0, 20.0, seed=3))
    n = len(offsets)
    assert abs(n - 20_000) < 4 * np.sqrt(20_000)  # within 4 sigma of the Poisson count
    gaps = np.diff(offsets)
    assert gaps.mean() == pytest.approx(1 / 1000, rel=0.03)
    # Exponential gaps have a coefficient of variation of 1 (constant gaps: 0).
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)
    assert np.all(gaps >= 0) and offsets[-1] < 20.0


def test_poisson_is_deterministic_per_seed_and_differs_across_seeds() -> None:
    a = schedule_offsets(ScheduleSpec(500.0, 1.0, seed=1))
    b = schedule_offsets(ScheduleSpec(500.0, 1.0, seed=1))
    c = schedule_offsets(ScheduleSpec(500.0, 1.0, seed=2))
    assert np.array_equal(a, b)
    assert len(a) != len(c) or not np.array_equal(a, c)


def test_poisson_parts_superpose_to_the_full_rate() -> None:
    spec = ScheduleSpec(2000.0, 5.0, seed=9)
    parts = [schedule_offsets(spec, parts=4, index=k) for k in range(4)]
    total = sum(len(p) for p in parts)
    assert abs(total - 10_000) < 4 * np.sqrt(10_000)
    for part in parts:  # each part is a Poisson stream at a quarter of the rate
        assert len(part) == pytest.approx(2500, abs=4 * np.sqrt(2500))
    assert not np.array_equal(parts[0][:10], parts[1][:10])


@pytest.mark.parametrize("arrivals", list(Arrivals))
def test_max_count_bounds_the_whole_run_across_parts(arrivals: Arrivals) -> None:
    spec = ScheduleSpec(1000.0, 10.0, max_count=101, arrivals=arrivals)
    parts = [schedule_offsets(spec, parts=3, index=k) for k in range(3)]
    assert sum(len(p) for p in parts) == 101
    assert window_s(spec) == pytest.approx(0.101)


def test_window_is_the_duration_without_a_count() -> None:
    assert window_s(ScheduleSpec(10.0, 3.0)) == 3.0
    assert window_s(ScheduleSpec(10.0, 3.0, max_count=100)) == 3.0


def test_split_count_hands_out_everything() -> None:
    assert [split_count(10, 3, k) for k in range(3)] == [4, 3, 3]
    assert sum(split_count(7, 7, k) for k in range(7)) == 7
    with pytest.raises(ValueError, match="out of range"):
        split_count(10, 3, 3)


@pytest.mark.parametrize(
    ("rate", "duration", "count"), [(0.0, 1.0, None), (1.0, 0.0, None), (1.0, 1.0, 0)]
)
def test_invalid_specs_are_rejected(rate: float, duration: float, count: int | None) -> None:
    with pytest.raises(ValueError, match="must be"):
        ScheduleSpec(rate, duration, max_count=count)


def test_part_index_is_checked() -> None:
    with pytest.raises(ValueError, match="out of range"):
        schedule_offsets(ScheduleSpec(1.0, 1.0), parts=2, index=2)
