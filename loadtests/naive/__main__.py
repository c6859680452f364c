"""``python -m loadtests.naive {server,worker}``: one naive baseline process, until SIGTERM.

Configured like the real services, by ``CASCADE_*`` variables (:class:`cascade.settings.Settings`);
:class:`loadtests.naive.NaiveStack` sets them. Both print ``READY`` once they serve.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from cascade.model_registry import load_registry
from cascade.runtime import configure_logging, run_service
from cascade.settings import Settings
from loadtests.naive.server import NaiveServer
from loadtests.naive.worker import NaiveScreeningWorker
from stages.screening.model import ScreeningModel


async def serve_scoring(stop: asyncio.Event) -> None:
    """The naive scoring server until ``stop``."""
    settings = Settings()
    configure_logging(settings.log_level)
    async with NaiveServer(settings) as server:
        print(f"LISTENING {settings.server.host}:{server.port}", flush=True)
        print("READY", flush=True)
        await stop.wait()


async def serve_worker(stop: asyncio.Event) -> None:
    """One naive screening worker until ``stop``."""
    settings = Settings()
    configure_logging(settings.log_level)
    registry = load_registry(settings.model_dir)
    model = ScreeningModel(registry.stage1_path, version=registry.stage1.version)
    async with NaiveScreeningWorker(
        model,
        nats_url=settings.nats.url,
        subject_prefix=settings.nats.subject_prefix,
        queue_group=settings.nats.queue_group,
        feature_set=registry.feature_set,
    ):
        print("READY", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m loadtests.naive", description=__doc__)
    parser.add_argument("role", choices=("server", "worker"))
    args = parser.parse_args(argv)
    run_service(serve_scoring if args.role == "server" else serve_worker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
