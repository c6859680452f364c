"""Several orchestrator processes on one port, under one parent (``CASCADE_SERVER__PROCESSES``).

A container runs one command, so ``python -m orchestrator`` with ``server.processes`` = N > 1
becomes a supervisor: it checks the port is free, starts N serving children (``python -m
orchestrator`` with the environment :func:`cascade.shared_port.shared_port_env` gives process
``i``: reuse-port on, metrics on ``metrics_port + i``), and then

* on SIGTERM/SIGINT forwards SIGTERM to every child, so each drains as a single process does
  (NOT_SERVING, ``shutdown_delay_s``, ``drain_s``), and exits 0 once all exited 0;
* when a child exits on its own, stops the others and exits 1, so the container's restart policy
  replaces the whole set instead of leaving it running short of a process.

The parent serves nothing itself: every serving process is alike, and the parent's only work is
to wait. ``cascade up`` does not use this module; it starts its N processes itself, each with its
own log and readiness line (:mod:`devstack.stack`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from typing import Final

from cascade.errors import ConfigurationError
from cascade.runtime import run_service
from cascade.settings import Settings
from cascade.shared_port import shared_port_env

__all__ = ["run_supervisor", "supervise"]

logger = logging.getLogger(__name__)

# On top of the children's own shutdown_delay_s + drain_s, before SIGKILL.
_STOP_MARGIN_S: Final = 5.0


def claim_port(host: str, port: int) -> int:
    """``port`` if nothing holds it on ``host`` (0: a free one), else ConfigurationError.

    Bound without SO_REUSEPORT: a server holding the port with reuse-port on would otherwise be
    joined silently by our children.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigurationError(f"cannot bind {host}:{port}: {exc}") from exc
        bound: int = sock.getsockname()[1]
        return bound


async def _stop_all(children: list[asyncio.subprocess.Process], timeout_s: float) -> None:
    for child in children:
        if child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
    waits = [child.wait() for child in children]
    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*waits)
    except TimeoutError:
        logger.warning("orchestrator children still running %.1f s after SIGTERM", timeout_s)
        for child in children:
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
        await asyncio.gather(*(child.wait() for child in children))


async def supervise(settings: Settings, stop: asyncio.Event) -> int:
    """Run ``settings.server.processes`` orchestrator children until ``stop`` or until one
    exits; stop them all; return the exit status for the supervisor (0: stopped cleanly)."""
    count = settings.server.processes
    port = claim_port(settings.server.host, settings.server.port)
    env = {**os.environ, "CASCADE_SERVER__PORT": str(port)}
    children: list[asyncio.subprocess.Process] = []
    crashed: list[tuple[int, asyncio.subprocess.Process]] = []
    try:
        for i in range(count):
            children.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "orchestrator",
                    stdin=asyncio.subprocess.DEVNULL,
                    env=shared_port_env(env, i, count),
                )
            )
        logger.info(
            "supervising %d orchestrator processes on %s:%d (pids %s)",
            count,
            settings.server.host,
            port,
            " ".join(str(c.pid) for c in children),
        )
        waits = {
            asyncio.create_task(child.wait(), name=f"orchestrator-child-{i}"): i
            for i, child in enumerate(children)
        }
        stopping = asyncio.create_task(stop.wait(), name="supervisor-stop")
        try:
            done, _ = await asyncio.wait({stopping, *waits}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stopping, *waits):
                task.cancel()
        crashed = [(waits[t], children[waits[t]]) for t in done if t in waits]
        for i, child in crashed:
            logger.error(
                "orchestrator process %d (pid %d) exited with status %s: stopping the others",
                i,
                child.pid,
                child.returncode,
            )
    finally:
        s = settings.server
        await _stop_all(children, s.shutdown_delay_s + s.drain_s + _STOP_MARGIN_S)
    if crashed:
        return 1
    statuses = [child.returncode for child in children]
    if any(status != 0 for status in statuses):
        logger.error("orchestrator processes exited with statuses %s", statuses)
        return 1
    return 0


def run_supervisor(settings: Settings) -> int:
    """Run :func:`supervise` on uvloop until SIGTERM/SIGINT; return the process exit status."""
    status = 1

    async def service(stop: asyncio.Event) -> None:
        nonlocal status
        status = await supervise(settings, stop)

    run_service(service)
    return status
