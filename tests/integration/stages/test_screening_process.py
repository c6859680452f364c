"""``python -m stages.screening`` as a process: its metrics port is its readiness signal.

deploy/k8s probes a worker with an HTTP GET on its metrics port, so the port must stay closed
until the worker is subscribed, and answer once it is.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from cascade.settings import DEFAULT_MODEL_DIR
from devstack.servers import NatsServer, free_port

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 60.0


def port_refuses(port: int) -> bool:
    """True when nothing accepts on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True


@asynccontextmanager
async def worker(nats_url: str, metrics_port: int) -> AsyncIterator[asyncio.subprocess.Process]:
    """A worker process on the repository's models; terminated (and reaped) on exit."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CASCADE_", "OTEL_"))},
        "CASCADE_MODEL_DIR": str(DEFAULT_MODEL_DIR),
        "CASCADE_NATS__URL": nats_url,
        "CASCADE_METRICS_PORT": str(metrics_port),
        "OTEL_SDK_DISABLED": "true",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "stages.screening",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), timeout=10)
            except TimeoutError:  # SIGTERM waits for start-up to finish, which may never come
                process.kill()
                await process.wait()


async def test_metrics_port_stays_closed_until_the_worker_is_subscribed() -> None:
    # A "NATS server" that accepts and never speaks: the worker waits in its first connect,
    # after its models loaded, where the metrics port used to be open already.
    connected = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()
        await reader.read()  # until the worker goes
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    nats_port = server.sockets[0].getsockname()[1]
    metrics_port = free_port()
    async with server, worker(f"nats://127.0.0.1:{nats_port}", metrics_port) as process:
        await asyncio.wait_for(connected.wait(), START_TIMEOUT_S)
        await asyncio.sleep(0.5)  # time for a port opened before the connect to be listening
        assert port_refuses(metrics_port), "metrics (readiness) open before NATS answered"
        assert process.returncode is None, "the worker should still be waiting for NATS"


async def test_metrics_port_answers_once_ready(nats_server: NatsServer) -> None:
    metrics_port = free_port()
    async with worker(nats_server.url, metrics_port) as process:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT_S)
        assert line.decode().strip() == "READY"
        body = await asyncio.to_thread(
            lambda: (
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
                .read()
                .decode()
            )
        )
        assert "cascade_screening_requests" in body
