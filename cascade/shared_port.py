"""Several processes of the orchestrator on one port: how many, and each one's environment.

One Python process saturates its event loop long before the machine does, so the orchestrator
scales out as N processes bound to the same port with ``SO_REUSEPORT``; the kernel hands each new
connection to one of them. Each process has its own event loop and its own Redis, NATS and Triton
connections. :func:`shared_port_env` is the one place that says how process ``i`` of ``N`` differs
from the others; ``cascade up`` (:mod:`devstack.stack`) and the container's supervisor
(:mod:`orchestrator.supervisor`) both use it. Pure functions: nothing here starts a process.

Metrics ports: with ``CASCADE_METRICS_PORT`` = B, orchestrator process ``i`` serves ``/metrics``
on B + ``i``; ``cascade up`` puts its screening worker ``j`` on B + N + ``j``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Final

__all__ = [
    "default_process_count",
    "local_stack_orchestrators",
    "metrics_port_offset",
    "shared_port_env",
]

_REUSE_PORT: Final = "CASCADE_SERVER__REUSE_PORT"
_PROCESSES: Final = "CASCADE_SERVER__PROCESSES"
_METRICS_PORT: Final = "CASCADE_METRICS_PORT"


def default_process_count() -> int:
    """The CPU cores this process may run on (at least 1): one orchestrator process per core.

    ``os.sched_getaffinity`` is what Python 3.13's ``os.process_cpu_count`` reads; it honours
    ``taskset`` and cpusets, unlike ``os.cpu_count``.
    """
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def local_stack_orchestrators() -> int:
    """Orchestrator processes for a stack that has the machine to itself, workers, NATS, Redis
    and Triton included (``cascade up``, ``cascade loadtest``): one per two usable cores, at
    least one, since the orchestrators get only part of the cores.

    Measured on a 2-core VM with every server and the load generator on it, two serving
    orchestrator processes against one (2026-12-01e): capacity at p99 <= 10 ms 645/s against
    753/s, at 1,936/s for 10 s 137 late answers and 115 DEADLINE_EXCEEDED against 8 and 4,
    and 1.07 against 0.83 ms of orchestrator CPU per answer at 274/s (each process then has half
    the calls to share a wake-up).
    """
    return max(1, default_process_count() // 2)


def shared_port_env(env: Mapping[str, str], index: int, count: int) -> dict[str, str]:
    """The environment of orchestrator process ``index`` of ``count`` sharing one port.

    Reuse-port is on only when ``count`` > 1 (one process alone keeps a taken port an error); the
    process serves rather than supervises; with ``CASCADE_METRICS_PORT`` set (and not 0), process
    ``i`` serves its metrics on that port + ``i``, so the processes do not collide.

    Raises:
        ValueError: ``index`` is outside ``0..count-1``, or a metrics port would pass 65535.
    """
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"process index {index} of {count} is out of range")
    out = metrics_port_offset(env, index)
    out[_REUSE_PORT] = "true" if count > 1 else "false"
    out[_PROCESSES] = "1"
    return out


def metrics_port_offset(env: Mapping[str, str], offset: int) -> dict[str, str]:
    """``env`` with ``CASCADE_METRICS_PORT`` moved up by ``offset`` (unchanged when unset or 0,
    which picks a free port), so processes started from one environment do not collide.

    Raises:
        ValueError: the moved port would pass 65535.
    """
    out = dict(env)
    metrics_port = out.get(_METRICS_PORT, "").strip()
    if metrics_port and int(metrics_port) != 0:
        port = int(metrics_port) + offset
        if port > 65535:
            raise ValueError(f"{_METRICS_PORT}={metrics_port} + {offset} is not a port")
        out[_METRICS_PORT] = str(port)
    return out
