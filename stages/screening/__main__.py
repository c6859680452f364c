"""``python -m stages.screening``: one screening worker, until SIGTERM (then it drains).

It serves every stage-1 version the registry asks for and follows the registry's changes
(:mod:`stages.screening.pool`).
"""

from __future__ import annotations

import asyncio

from opentelemetry import trace

from cascade.metrics import MetricsEndpoint
from cascade.runtime import configure_logging, freeze_heap, run_service
from cascade.settings import Settings
from cascade.telemetry import tracer_provider
from stages.screening.pool import ScreeningPool


async def serve(stop: asyncio.Event) -> None:
    """Load and warm the models, subscribe, open the metrics port, serve until ``stop``."""
    settings = Settings()
    configure_logging(settings.log_level)
    with tracer_provider("cascade-screening-worker") as provider:
        trace.set_tracer_provider(provider)
        async with ScreeningPool(settings, provider.get_tracer("cascade.screening")):
            if settings.gc_freeze:
                freeze_heap()
            # The metrics port opens only now, with every model loaded and subscribed: an HTTP
            # GET on it is the worker's readiness signal (deploy/k8s probes it), and a worker
            # that cannot reach NATS at start never looks ready.
            with MetricsEndpoint(settings.metrics_port, settings.metrics_host):
                print("READY", flush=True)
                await stop.wait()


def main() -> None:
    """Console entry point."""
    run_service(serve)


if __name__ == "__main__":
    main()
