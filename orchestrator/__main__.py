"""``python -m orchestrator``: run the scoring gRPC server until SIGTERM, then drain.

With ``CASCADE_SERVER__PROCESSES`` above 1 it supervises that many serving processes on the one
port instead (:mod:`orchestrator.supervisor`).
"""

from __future__ import annotations

import os

from cascade.grpc_stack import GRPC_EXPERIMENTS_DEFAULT

# Before anything imports grpc: serve on gRPC's iomgr TCP stack (see cascade.grpc_stack).
os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS_DEFAULT)

import asyncio
import logging
import sys
from typing import Final

from opentelemetry import trace

from cascade.metrics import MetricsEndpoint
from cascade.runtime import configure_logging, run_service
from cascade.settings import Settings
from cascade.telemetry import tracer_provider
from orchestrator.server import Orchestrator
from orchestrator.supervisor import run_supervisor

logger = logging.getLogger("orchestrator")

# Warm-up retries until Triton and a worker answer; whoever started us decides how long to wait.
_SERVING_WAIT_S: Final = 7 * 24 * 3600.0


async def _announce_serving(app: Orchestrator) -> None:
    # With several processes on one port a health check reaches only one of them, so each one
    # says for itself, on stdout, that it is SERVING (cascade up waits for this line in its log).
    await app.wait_serving(_SERVING_WAIT_S)
    print("SERVING", flush=True)


async def serve(stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set, then stop taking calls and finish the in-flight ones."""
    settings = Settings()
    configure_logging(settings.log_level)
    with (
        MetricsEndpoint(settings.metrics_port, settings.metrics_host),
        tracer_provider("cascade-orchestrator") as provider,
    ):
        trace.set_tracer_provider(provider)
        async with Orchestrator(settings, tracer_provider=provider) as app:
            # Machine-readable line for supervisors (cascade up) that started us with port 0.
            print(f"LISTENING {settings.server.host}:{app.port}", flush=True)
            async with asyncio.TaskGroup() as tasks:
                announce = tasks.create_task(_announce_serving(app), name="announce-serving")
                await stop.wait()
                announce.cancel()
            logger.info("stop requested: draining")
            await app.drain()


def main() -> None:
    """Console entry point."""
    settings = Settings()
    if settings.server.processes > 1:
        configure_logging(settings.log_level)
        sys.exit(run_supervisor(settings))
    run_service(serve)


if __name__ == "__main__":
    main()
