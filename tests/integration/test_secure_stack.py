"""``cascade up --tls`` as a user runs it: the secure stack with one command, mutual TLS on the
scoring port (two processes on one port), NATS with TLS and a password, Redis with an ACL user."""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path

import grpc
import pytest

from cascade.settings import DEFAULT_MODEL_DIR
from cascade.v1 import scoring_pb2, scoring_pb2_grpc
from devstack.servers.redis import find_tls_redis_server
from devstack.stack import ClientTls, scoring_channel
from tests.integration.cascade.conftest import new_request
from tests.integration.conftest import processes_mentioning
from tests.integration.test_cascade_cli import run_cascade, start_up

pytestmark = pytest.mark.integration


def _stack_passwords(run_dir: Path) -> dict[str, str]:
    """The NATS and Redis passwords in the environment of the stack's services (those whose
    environment names the run dir's decision spool)."""
    spool = f"CASCADE_DECISION_LOG__SPOOL_DIR={run_dir / 'decision-spool'}"
    found: dict[str, str] = {}
    for proc in Path("/proc").iterdir():
        try:
            entries = (proc / "environ").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if spool not in entries:
            continue
        for entry in entries:
            key, _, value = entry.partition("=")
            if key in ("CASCADE_NATS__PASSWORD", "CASCADE_REDIS__PASSWORD") and value:
                found[key] = value
    return found


async def _code(tls: ClientTls | None, target: str) -> grpc.StatusCode:
    async with scoring_channel(target, tls) as channel:
        try:
            await scoring_pb2_grpc.ScoringServiceStub(channel).Score(new_request(), timeout=2.0)
        except grpc.aio.AioRpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
    return grpc.StatusCode.OK


async def test_up_tls_runs_the_secure_stack_with_one_command(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = await start_up(
        "--tls",
        "--workers=1",
        "--orchestrators=2",
        "--sample=4",
        f"--model-dir={DEFAULT_MODEL_DIR}",
        f"--run-dir={run_dir}",
    )
    assert proc.stdout is not None
    seen = ""
    try:
        async with asyncio.timeout(180):
            while "running;" not in seen:
                line = await proc.stdout.readline()
                assert line, seen
                seen += line.decode()
        found = re.search(r"scoring endpoint\s+grpcs://(127\.0\.0\.1:\d+)", seen)
        assert found, seen
        target = found.group(1)
        # Redis speaks TLS where a redis-server built with it is installed (Debian's).
        scheme = "rediss" if find_tls_redis_server() is not None else "redis"
        assert f"redis {scheme}://127.0.0.1:" in seen, seen
        rows = [line for line in seen.splitlines() if line.startswith("tx-")]
        assert len(rows) == 4 and not any("error" in row for row in rows), seen
        assert all(re.search(r"\b(STAGE1|STAGE2)\b", row) for row in rows), seen
        tls_dir = run_dir / "tls"
        client = ClientTls.from_dir(tls_dir)
        assert await _code(client, target) == grpc.StatusCode.OK
        assert await _code(ClientTls(client.ca_file), target) == grpc.StatusCode.UNAVAILABLE
        assert await _code(None, target) == grpc.StatusCode.UNAVAILABLE
        # Every answer went through stage 1 over NATS's TLS and found Redis behind its ACL.
        async with scoring_channel(target, client) as channel:
            reply = await scoring_pb2_grpc.ScoringServiceStub(channel).Score(
                new_request(), timeout=2.0
            )
        assert reply.decided_by in (
            scoring_pb2.DECIDED_BY_STAGE1,
            scoring_pb2.DECIDED_BY_STAGE2,
        ), reply
        assert not reply.degraded, reply
        code, out = await run_cascade(
            "score", f"--target={target}", f"--tls-dir={tls_dir}", "--count=2", "--no-history"
        )
        assert code == 0, out
        assert len([line for line in out.splitlines() if line.startswith("tx-")]) == 2, out
        assert "error" not in out, out
        # The passwords (new each start, in the services' environment only) are in no log.
        passwords = _stack_passwords(run_dir)
        assert len(passwords) == 2, passwords.keys()
        logs = "".join(p.read_text(errors="replace") for p in (run_dir / "logs").iterdir())
        assert not [name for name, value in passwords.items() if value in logs]
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            await proc.communicate()
    assert proc.returncode == 0
    assert processes_mentioning(run_dir) == set()
