"""One managed server process: start in its own process group, probe until ready, always stop.

``ManagedProcess`` is what every server class here builds on. Output goes to a log file (never to
our stdout); the tail of that file is quoted in every start error. Stopping sends SIGTERM to the
whole process group, SIGKILL after a grace period, and waits for the process even when the caller
is being cancelled, so no server outlives the block that started it.

A process that exited can be started again with :meth:`ManagedProcess.restart` (same command,
same ports, same log file); :mod:`devstack.supervision` does that for a process that exits on its
own, and never for one that :meth:`ManagedProcess.stop` stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final, Self

from devstack.servers._errors import ServerStartError

if TYPE_CHECKING:
    from types import TracebackType

logger = logging.getLogger(__name__)

LOOPBACK: Final = "127.0.0.1"
DEFAULT_STOP_GRACE_S: Final = 5.0
_LOG_TAIL_LINES: Final = 40
_LOG_TAIL_BYTES: Final = 16_384
_REUSE_AFTER_S: Final = 120.0
_ATTEMPTS: Final = 100
_HANDED_OUT: dict[int, float] = {}  # port -> monotonic time free_port() returned it

ReadinessProbe = Callable[[], Awaitable[bool]]
"""An async check that returns True once the server answers; exceptions count as "not yet"."""


def _ephemeral_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bound and released by the OS).

    Never one this process handed out in the last ``_REUSE_AFTER_S``: the kernel may offer a
    just-released port again, and two servers of one stack (Triton's HTTP and gRPC ports, seen
    once) were then given the same port before either had bound it.
    """
    now = time.monotonic()
    for port, at in list(_HANDED_OUT.items()):
        if now - at > _REUSE_AFTER_S:
            del _HANDED_OUT[port]
    for _ in range(_ATTEMPTS):
        port = _ephemeral_port()
        if port not in _HANDED_OUT:
            _HANDED_OUT[port] = now
            return port
    raise OSError(f"no fresh loopback port in {_ATTEMPTS} attempts")


def free_port_pair(offset: int, *, low: int = 20_000, high: int = 30_000) -> int:
    """A free loopback port P in ``low..high`` whose P + ``offset`` is free too (Redis 6 puts its
    cluster bus on port + 10000), neither handed out by :func:`free_port` lately. Below the
    kernel's usual ephemeral range, so outgoing connections do not take them meanwhile."""
    now = time.monotonic()
    for _ in range(_ATTEMPTS):
        port = random.randint(low, high)
        pair = (port, port + offset)
        if any(p in _HANDED_OUT for p in pair) or not all(port_is_free(p) for p in pair):
            continue
        for p in pair:
            _HANDED_OUT[p] = now
        return port
    raise OSError(f"no free loopback port pair in {_ATTEMPTS} attempts")


def port_is_free(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:``port`` (bound with SO_REUSEADDR, as servers do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def resolve_port(port: int) -> int:
    """Return ``port``, or a free loopback port when it is 0."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be within 0..65535, got {port}")
    return port if port else free_port()


def make_log_dir(log_dir: Path | None, name: str) -> Path:
    """Return ``log_dir`` created if needed, or a fresh temporary folder (kept for inspection)."""
    if log_dir is None:
        return Path(tempfile.mkdtemp(prefix=f"cascade-{name}-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    return log_dir


def read_log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """Return the last ``lines`` lines of a log file ('' when it does not exist)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - _LOG_TAIL_BYTES))
            data = fh.read()
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-lines:])


class StartStop:
    """An async context manager made of ``start()`` and ``stop()``: stop runs however the block
    ends (error, cancellation included)."""

    async def start(self) -> None:
        """Start and wait until ready."""
        raise NotImplementedError

    async def stop(self) -> object:
        """Stop and clean up."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


class OneProcessServer(StartStop):
    """A server that is one :class:`ManagedProcess` (``self.process``): its name, pid, state and
    restart are the process's."""

    process: ManagedProcess

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self.process.pid

    @property
    def name(self) -> str:
        """The process's name in logs (``redis-PORT`` / ``nats-PORT``)."""
        return self.process.name

    @property
    def stopping(self) -> bool:
        """True once stopped on purpose."""
        return self.process.stopping

    async def wait(self) -> int:
        """Wait until the server process exits; its exit status."""
        return await self.process.wait()

    async def restart(self) -> None:
        """Start the exited server again on the same port and wait until it is ready."""
        await self.process.restart()


class ManagedProcess(StartStop):
    """A subprocess in its own process group with a log file, a readiness wait and a sure stop.

    Use as ``async with ManagedProcess(...) as proc:``; entering starts the process and waits for
    ``probe`` (if given); leaving stops it (SIGTERM to the group, SIGKILL after ``stop_grace_s``)
    and waits until it is reaped, also when the body raised or the task was cancelled.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        probe: ReadinessProbe | None = None,
        ports: Sequence[int] = (),
        start_timeout_s: float = 30.0,
        probe_interval_s: float = 0.05,
        stop_grace_s: float = DEFAULT_STOP_GRACE_S,
        check_ports_on_restart: bool = True,
    ) -> None:
        if not argv:
            raise ValueError("argv must name the executable")
        self.name: Final = name
        self.argv: Final = tuple(argv)
        self.log_path: Final = make_log_dir(log_dir, name) / f"{name}.log"
        """Where stdout and stderr go (appended, one header line per start)."""
        self._env = dict(env) if env is not None else None
        self._cwd = cwd
        self.probe = probe
        """Readiness check run until it passes after each start (settable after construction,
        for probes that need the process itself, e.g. its :attr:`log_offset`)."""
        self._ports = tuple(ports)
        self._check_ports_on_restart = check_ports_on_restart
        self._start_timeout_s = start_timeout_s
        self._probe_interval_s = probe_interval_s
        self._stop_grace_s = stop_grace_s
        self._proc: asyncio.subprocess.Process | None = None
        self._exited: asyncio.Task[int] | None = None
        self._stopping = False
        self.log_offset = 0
        """Where in :attr:`log_path` the output of the latest start begins (bytes)."""

    @property
    def pid(self) -> int | None:
        """The process id once started (also its process-group id), else None."""
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit status once the process ended (negative: killed by that signal), else None."""
        return self._proc.returncode if self._proc is not None else None

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called: the process ends on purpose, not by accident."""
        return self._stopping

    @property
    def running(self) -> bool:
        """True while the process has been started and has not exited."""
        return self._proc is not None and self._proc.returncode is None

    async def wait(self) -> int:
        """Wait until the process exits (without stopping it); return its exit status."""
        if self._exited is None:
            raise RuntimeError(f"{self.name} was not started")
        return await asyncio.shield(self._exited)

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the process log."""
        return read_log_tail(self.log_path, lines)

    async def start(self) -> None:
        """Start the process and wait until the probe passes; on failure stop it and raise.

        Raises:
            ServerStartError: one of ``ports`` is taken (else the probe could be answered by
                whatever holds it), the process exited, or the probe did not pass in time.
        """
        if self._proc is not None:
            raise RuntimeError(f"{self.name} was already started")
        await self._spawn(check_ports=True)

    async def restart(self) -> None:
        """Start the exited process again (same command, ports and log) and wait until ready.

        What is left of its process group (children that outlived the leader) is killed first.
        Raises ``ServerStartError`` as :meth:`start` does; ``RuntimeError`` if it is still
        running, was never started, or was stopped on purpose.
        """
        if self._proc is None or self._stopping:
            raise RuntimeError(f"{self.name} was not started, or was stopped on purpose")
        if self._proc.returncode is None:
            raise RuntimeError(f"{self.name} is still running")
        self._signal_group(signal.SIGKILL)
        await self._spawn(check_ports=self._check_ports_on_restart)

    async def _spawn(self, *, check_ports: bool) -> None:
        taken = [port for port in self._ports if check_ports and not port_is_free(port)]
        if taken:
            raise ServerStartError(
                f"{self.name}: port {', '.join(map(str, taken))} on {LOOPBACK} is already in use"
            )
        with self.log_path.open("ab") as log:
            self.log_offset = log.tell()
            log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {self.argv!r}\n".encode())
            log.flush()
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=self._env,
                cwd=self._cwd,
                start_new_session=True,
            )
        self._exited = asyncio.create_task(self._proc.wait(), name=f"{self.name}-wait")
        logger.info("started %s (pid %d), log %s", self.name, self._proc.pid, self.log_path)
        try:
            await self._wait_ready()
        except BaseException:
            await self._terminate()
            raise

    async def _wait_ready(self) -> None:
        proc, exited = self._proc, self._exited
        assert proc is not None
        assert exited is not None
        started = time.monotonic()
        deadline = started + self._start_timeout_s
        while True:
            if proc.returncode is not None:
                raise ServerStartError(self._start_failure(f"exited with status {proc.returncode}"))
            if self.probe is None or await self._probe_once():
                logger.info("%s ready after %.2f s", self.name, time.monotonic() - started)
                return
            if time.monotonic() >= deadline:
                raise ServerStartError(
                    self._start_failure(f"not ready after {self._start_timeout_s:.1f} s")
                )
            # Wake early if the process dies, so a crash is reported at once.
            await asyncio.wait({exited}, timeout=self._probe_interval_s)

    async def _probe_once(self) -> bool:
        assert self.probe is not None
        try:
            return await self.probe()
        except Exception as exc:  # the probe's failures only mean "not ready yet"
            logger.debug("%s probe: %r", self.name, exc)
            return False

    def _start_failure(self, what: str) -> str:
        tail = self.log_tail() or "(log is empty)"
        return f"{self.name} {what}; command {' '.join(self.argv)}\nlog {self.log_path}:\n{tail}"

    async def stop(self) -> int | None:
        """Stop the process group (SIGTERM, then SIGKILL after the grace period) and reap it.

        Safe to call more than once; returns the exit status. If cancelled while waiting, the
        group is killed with SIGKILL and reaped before the cancellation propagates. A process
        stopped here is never restarted by a supervisor.
        """
        self._stopping = True
        return await self._terminate()

    async def _terminate(self) -> int | None:
        proc, exited = self._proc, self._exited
        if proc is None or exited is None:
            return None
        try:
            if not exited.done():
                self._signal_group(signal.SIGTERM)
                try:
                    await asyncio.wait_for(asyncio.shield(exited), self._stop_grace_s)
                except TimeoutError:
                    logger.warning(
                        "%s did not stop within %.1f s of SIGTERM; sending SIGKILL",
                        self.name,
                        self._stop_grace_s,
                    )
                    self._signal_group(signal.SIGKILL)
                    await asyncio.shield(exited)
        except asyncio.CancelledError:
            self._signal_group(signal.SIGKILL)
            await asyncio.shield(exited)
            raise
        finally:
            # Children that outlived the leader (same process group) must not linger.
            self._signal_group(signal.SIGKILL)
        logger.info("stopped %s (pid %d, status %s)", self.name, proc.pid, proc.returncode)
        return proc.returncode

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)


async def tcp_exchange(
    host: str,
    port: int,
    send: bytes,
    expect_prefix: bytes,
    timeout_s: float = 1.0,
    tls: ssl.SSLContext | None = None,
) -> bool:
    """Connect (over TLS with ``tls``), send ``send`` (may be empty); True when the first line
    read starts as expected."""
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(host, port, ssl=tls)
        try:
            if send:
                writer.write(send)
                await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return line.startswith(expect_prefix)


async def tcp_contains(
    host: str,
    port: int,
    send: bytes,
    needle: bytes,
    timeout_s: float = 1.0,
    tls: ssl.SSLContext | None = None,
) -> bool:
    """Connect (over TLS with ``tls``), send ``send``, read one chunk (up to 64 KiB); True when
    it contains ``needle``."""
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(host, port, ssl=tls)
        try:
            writer.write(send)
            await writer.drain()
            data = await reader.read(65536)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return needle in data


def _http_status(url: str, timeout_s: float) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code


async def http_ok(url: str, timeout_s: float = 1.0) -> bool:
    """True when a GET of ``url`` answers 200 (run in a thread; for readiness probes only)."""
    return await asyncio.to_thread(_http_status, url, timeout_s) == 200
