"""Load tests of the scoring cascade: an open-loop generator, the report, the sweep, a baseline.

* :mod:`loadtests.schedule`  arrival schedules (Poisson or constant), split over processes
* :mod:`loadtests.histogram` a mergeable HdrHistogram-style latency histogram
* :mod:`loadtests.replay`    simulator transactions as requests, with a share of repeats
* :mod:`loadtests.results`   what one step observed (counts and histograms that merge)
* :mod:`loadtests.report`    summaries, pass/fail at the SLO, capacity, ratios, goals
* :mod:`loadtests.client`    the gRPC client and the open-loop / serial send loops
* :mod:`loadtests.processes` several generator processes with a synchronised start
* :mod:`loadtests.runner`    warm-up, serial step, open-loop steps and the sweep on one target
* :mod:`loadtests.naive`     the naive baseline cascade, started beside the real one
* :mod:`loadtests.plots`     the PNGs
* :mod:`loadtests.cli`       ``cascade loadtest``

The pure modules (schedule, histogram, replay, results, report, address, progress formatting)
do no I/O and are unit-tested without sockets.
"""

from __future__ import annotations

from loadtests.address import LoopbackTarget, NotLoopbackError, parse_loopback_target
from loadtests.histogram import Histogram
from loadtests.report import Criteria, SweepPlan
from loadtests.runner import LoadSettings, TargetRunner
from loadtests.schedule import Arrivals, ScheduleSpec

__all__ = [
    "Arrivals",
    "Criteria",
    "Histogram",
    "LoadSettings",
    "LoopbackTarget",
    "NotLoopbackError",
    "ScheduleSpec",
    "SweepPlan",
    "TargetRunner",
    "parse_loopback_target",
]
