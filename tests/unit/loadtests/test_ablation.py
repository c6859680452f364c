"""The ablation table: numbers pulled from reports, medians per variant."""

from __future__ import annotations

from typing import Any

from loadtests.ablation import extract, summarize


def report(p50: float, cpu: float) -> dict[str, Any]:
    latency = {"p50": p50, "p99": p50 * 2, "p99_9": p50 * 3}
    return {
        "targets": {
            "cascade": {
                "serial": {"latency_ms": latency},
                "steps": [
                    {
                        "latency_ms": latency,
                        "cpu": {
                            "ms_per_answer": {
                                "orchestrator": cpu,
                                "screening-workers": cpu / 2,
                                "nats": cpu / 4,
                                "stack": cpu * 2,
                            }
                        },
                    }
                ],
            }
        }
    }


def test_extract_reads_serial_and_step_columns() -> None:
    values = extract(report(2.0, 1.5))
    assert values["1-in-flight p50 ms"] == 2.0
    assert values["load p99.9 ms"] == 6.0
    assert values["orchestrator CPU ms/answer"] == 1.5
    assert values["workers CPU ms/answer"] == 0.75
    assert values["NATS CPU ms/answer"] == 0.375
    assert values["stack CPU ms/answer"] == 3.0


def test_summary_reports_the_median_of_each_variant() -> None:
    runs = {
        "all on": [extract(report(p, 1.0)) for p in (1.0, 9.0, 2.0)],
        "off": [extract(report(p, 2.0)) for p in (3.0, 4.0)],
    }
    table = summarize(runs).splitlines()
    assert table[0].startswith("| variant | runs | 1-in-flight p50 ms")
    assert table[2].startswith("| all on | 3 | 2.000 | 4.000 |")  # median, not mean (4.0)
    assert table[3].startswith("| off | 2 | 3.500 |")
