"""``python -m orchestrator``: run the scoring gRPC server until SIGTERM, then drain."""

from __future__ import annotations

import asyncio
import logging

from opentelemetry import trace

from cascade.metrics import MetricsEndpoint
from cascade.runtime import configure_logging, run_service
from cascade.settings import Settings
from cascade.telemetry import tracer_provider
from orchestrator.server import Orchestrator

logger = logging.getLogger("orchestrator")


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
            await stop.wait()
            logger.info("stop requested: draining")
            await app.drain()


def main() -> None:
    """Console entry point."""
    run_service(serve)


if __name__ == "__main__":
    main()
