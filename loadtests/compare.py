"""Another commit's stack beside the current one, for side-by-side load in one run.

:class:`CompareStack` (an async context manager) makes a detached git worktree of a ref under
``.run/compare/<commit>`` (reused when it is already there, at that commit), then starts that
checkout's own ``python -m devstack.cli up`` as a subprocess with the checkout as working directory
and ``PYTHONPATH``, every port 0 (free loopback ports), and reads its scoring endpoint from its
output. The stack's servers are that subprocess's children, so
:class:`~loadtests.cpu.CpuMeter` can attribute their CPU to it (``stack_root``). On exit it sends
SIGTERM (``cascade up`` then stops what it started), waits, and kills the process group if it
has to.

The other checkout may be older than this one: only flags its ``up --help`` lists are passed
(:func:`up_arguments`), and the endpoint is read from either ``LISTENING HOST:PORT`` or the
``scoring endpoint  grpc://HOST:PORT`` line ``cascade up`` has always printed (:func:`parse_endpoint`). Both are pure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Final

__all__ = ["CompareStack", "CompareStackError", "parse_endpoint", "up_arguments"]

logger = logging.getLogger(__name__)

_ENDPOINT: Final = re.compile(
    r"(?:LISTENING\s+|scoring endpoint\s+grpc://)((?:127\.\d+\.\d+\.\d+|localhost|\[::1\]):\d+)"
)
_PORT_FLAGS: Final = (
    "--port",
    "--redis-port",
    "--nats-port",
    "--triton-grpc-port",
    "--triton-http-port",
    "--triton-metrics-port",
)
_START_TIMEOUT_S: Final = 180.0
_STOP_TIMEOUT_S: Final = 30.0
_GIT_TIMEOUT_S: Final = 120.0


class CompareStackError(RuntimeError):
    """The compared checkout could not be made or its stack did not come up."""


def parse_endpoint(text: str) -> str | None:
    """The first loopback ``HOST:PORT`` announced in ``cascade up``'s output, or None."""
    match = _ENDPOINT.search(text)
    return match.group(1) if match else None


def up_arguments(
    help_text: str, *, workers: int, run_dir: Path, orchestrators: int | None = None
) -> list[str]:
    """``cascade up`` arguments for free ports, ``workers``, ``orchestrators`` and ``run_dir``,
    keeping only the flags ``help_text`` (that checkout's ``up --help``) lists. The orchestrator
    count must be passed: ``cascade up``'s own default (one per core before 2026-12-01e) may differ, and a loadtest that put
    one process on its own side against that would compare two layouts, not two commits."""
    known = set(re.findall(r"--[a-z][a-z0-9-]*", help_text))
    args: list[str] = []
    for flag in _PORT_FLAGS:
        if flag in known:
            args += [flag, "0"]
    if "--workers" in known:
        args += ["--workers", str(workers)]
    if orchestrators is not None and "--orchestrators" in known:
        args += ["--orchestrators", str(orchestrators)]
    if "--run-dir" in known:
        args += ["--run-dir", str(run_dir)]
    return args


def _git(repo: Path, *args: str) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), *args],
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            check=True,
        )
    except subprocess.CalledProcessError as exc:
        raise CompareStackError(f"git {' '.join(args)}: {exc.stderr.strip()}") from exc
    except (OSError, subprocess.SubprocessError) as exc:
        raise CompareStackError(f"git {' '.join(args)}: {exc}") from exc
    return out.stdout.strip()


def ensure_worktree(repo: Path, ref: str) -> tuple[Path, str]:
    """A detached worktree of ``ref`` under ``repo/.run/compare/``: (its path, the commit)."""
    commit = _git(repo, "rev-parse", "--verify", f"{ref}^{{commit}}")
    path = repo / ".run" / "compare" / commit[:12]
    if path.exists():
        if _git(path, "rev-parse", "HEAD") != commit:
            raise CompareStackError(f"{path} exists but is not at {commit[:12]}")
        return path, commit
    path.parent.mkdir(parents=True, exist_ok=True)
    _git(repo, "worktree", "add", "--detach", str(path), commit)
    return path, commit


class CompareStack:
    """The stack of ``ref``'s checkout, started with its own ``cascade up``.

    ``target`` is its scoring endpoint, ``pid`` the ``cascade up`` process (its stack's root),
    ``commit`` the full commit and ``path`` the worktree.
    """

    def __init__(
        self,
        repo: Path,
        ref: str,
        *,
        run_dir: Path,
        workers: int = 2,
        orchestrators: int | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.ref = ref
        self._repo = repo
        self._run_dir = run_dir
        self._workers = workers
        self._orchestrators = orchestrators
        self._extra_env = dict(extra_env or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.path: Path | None = None
        self.commit = ""
        self.target = ""

    @property
    def pid(self) -> int:
        """The ``cascade up`` process of the compared checkout."""
        if self._proc is None:
            raise RuntimeError("CompareStack used outside its async with block")
        return self._proc.pid

    def _env(self, path: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
        return env | {"PYTHONPATH": str(path), "PYTHONUNBUFFERED": "1"} | self._extra_env

    async def __aenter__(self) -> CompareStack:
        path, self.commit = await asyncio.to_thread(ensure_worktree, self._repo, self.ref)
        self.path = path
        help_out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "devstack.cli", "up", "--help"],
            cwd=path,
            env=self._env(path),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if help_out.returncode != 0:
            raise CompareStackError(f"{self.ref}: cascade up --help failed: {help_out.stderr}")
        args = up_arguments(
            help_out.stdout,
            workers=self._workers,
            run_dir=self._run_dir,
            orchestrators=self._orchestrators,
        )
        self._run_dir.mkdir(parents=True, exist_ok=True)
        log_path = self._run_dir / "up.log"
        self._log = log_path.open("wb")
        self._proc = await asyncio.to_thread(
            subprocess.Popen,
            [sys.executable, "-m", "devstack.cli", "up", *args],
            cwd=path,
            env=self._env(path),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so a stuck stop can be killed whole
        )
        try:
            self.target = await self._wait_for_endpoint(log_path)
        except BaseException:
            await self._stop()
            raise
        logger.info("compared stack %s (%s) at %s", self.ref, self.commit[:12], self.target)
        return self

    async def _wait_for_endpoint(self, log_path: Path) -> str:
        assert self._proc is not None
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            text = await asyncio.to_thread(log_path.read_text, errors="replace")
            endpoint = parse_endpoint(text)
            if endpoint:
                return endpoint
            if self._proc.poll() is not None:
                raise CompareStackError(
                    f"{self.ref}: cascade up exited with {self._proc.returncode}:\n{text[-2000:]}"
                )
            await asyncio.sleep(0.2)
        raise CompareStackError(f"{self.ref}: no endpoint within {_START_TIMEOUT_S:.0f} s")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stop()

    async def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, _STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning("compared stack did not stop on SIGTERM; killing its group")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await asyncio.to_thread(proc.wait)
        if self._log is not None:
            self._log.close()
            self._log = None
