"""``python -m stages.screening``: one screening worker, until SIGTERM (then it drains)."""

from __future__ import annotations

import asyncio

from opentelemetry import trace

from cascade.metrics import MetricsEndpoint
from cascade.model_registry import load_registry
from cascade.runtime import configure_logging, freeze_heap, run_service
from cascade.settings import Settings
from cascade.telemetry import tracer_provider
from stages.screening.model import ScreeningModel
from stages.screening.worker import ScreeningWorker


async def serve(stop: asyncio.Event) -> None:
    """Load and warm the model, subscribe, serve until ``stop``."""
    settings = Settings()
    configure_logging(settings.log_level)
    registry = load_registry(settings.model_dir)
    model = ScreeningModel(
        settings.model_dir / registry.stage1.path,
        version=registry.stage1.version,
        intra_op_threads=settings.screening.intra_op_threads,
    )
    with (
        MetricsEndpoint(settings.metrics_port, settings.metrics_host),
        tracer_provider("cascade-screening-worker") as provider,
    ):
        trace.set_tracer_provider(provider)
        async with ScreeningWorker(
            model,
            nats_url=settings.nats.url,
            subject_prefix=settings.nats.subject_prefix,
            queue_group=settings.nats.queue_group,
            feature_set=registry.feature_set,
            tracer=provider.get_tracer("cascade.screening"),
            heartbeat_s=settings.hedging.heartbeat_s,
        ):
            if settings.gc_freeze:
                freeze_heap()
            print("READY", flush=True)
            await stop.wait()


def main() -> None:
    """Console entry point."""
    run_service(serve)


if __name__ == "__main__":
    main()
