"""Arrival schedules for an open-loop load generator: when each request *should* be sent.

Pure functions, no clocks: a schedule is a sorted array of offsets in seconds from the start of a
run. The generator sends request ``i`` at ``start + offsets[i]`` and measures its latency from
that intended moment, not from when it actually went out, so a stalled generator or server cannot
hide queueing delay (coordinated omission).

Splitting a rate over ``n`` generator processes keeps the overall arrival process intact:
independent Poisson streams of ``rate / n`` superpose to a Poisson stream of ``rate``, and constant
arrivals are interleaved (process ``k`` takes slots ``k, k + n, k + 2n, ...``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt

__all__ = ["Arrivals", "ScheduleSpec", "schedule_offsets", "split_count", "window_s"]


class Arrivals(StrEnum):
    """How inter-arrival gaps are drawn."""

    POISSON = "poisson"  # exponential gaps: what independent callers look like
    CONSTANT = "constant"  # evenly spaced: the kindest possible load at a given rate


@dataclass(frozen=True, slots=True)
class ScheduleSpec:
    """A whole run's arrivals: ``rate_per_s`` for at most ``duration_s`` and ``max_count``."""

    rate_per_s: float
    duration_s: float
    max_count: int | None = None
    arrivals: Arrivals = Arrivals.POISSON
    seed: int = 1

    def __post_init__(self) -> None:
        if not self.rate_per_s > 0:
            raise ValueError(f"rate_per_s must be > 0, got {self.rate_per_s}")
        if not self.duration_s > 0:
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")
        if self.max_count is not None and self.max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {self.max_count}")


def window_s(spec: ScheduleSpec) -> float:
    """The nominal length of the run: the duration, or less when ``max_count`` ends it first."""
    if spec.max_count is None:
        return spec.duration_s
    return min(spec.duration_s, spec.max_count / spec.rate_per_s)


def split_count(total: int, parts: int, index: int) -> int:
    """How many of ``total`` items part ``index`` of ``parts`` gets (the first ones get the rest)."""
    if parts < 1 or not 0 <= index < parts:
        raise ValueError(f"index {index} out of range for {parts} parts")
    return total // parts + (1 if index < total % parts else 0)


def schedule_offsets(
    spec: ScheduleSpec, *, parts: int = 1, index: int = 0
) -> npt.NDArray[np.float64]:
    """Intended send offsets (seconds, ascending) of part ``index`` of a run split ``parts`` ways.

    The union over all parts has about ``rate_per_s * duration_s`` arrivals (exactly that many for
    constant arrivals), never more than ``max_count``, all within ``[0, duration_s)``.
    """
    if parts < 1 or not 0 <= index < parts:
        raise ValueError(f"index {index} out of range for {parts} parts")
    cap = spec.max_count
    part_cap = None if cap is None else split_count(cap, parts, index)
    if spec.arrivals is Arrivals.CONSTANT:
        total = math.ceil(spec.rate_per_s * spec.duration_s - 1e-9)
        if cap is not None:
            total = min(total, cap)
        slots = np.arange(index, total, parts, dtype=np.float64)
        return slots / spec.rate_per_s
    rng = np.random.default_rng([spec.seed, parts, index])
    part_rate = spec.rate_per_s / parts
    expected = part_rate * spec.duration_s
    # Draw comfortably more gaps than needed (mean + 6 sigma + slack), then cut at the duration.
    n_draw = int(expected + 6.0 * math.sqrt(expected) + 16)
    offsets = np.cumsum(rng.exponential(1.0 / part_rate, size=n_draw))
    while offsets[-1] < spec.duration_s:  # astronomically rare; keep drawing
        more = offsets[-1] + np.cumsum(rng.exponential(1.0 / part_rate, size=n_draw))
        offsets = np.concatenate([offsets, more])
    offsets = offsets[offsets < spec.duration_s]
    if part_cap is not None:
        offsets = offsets[:part_cap]
    return np.asarray(offsets, dtype=np.float64)
