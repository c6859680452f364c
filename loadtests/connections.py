"""Which local process holds each TCP connection to a loopback port, read from /proc.

Several orchestrator processes share one port with SO_REUSEPORT, and the kernel gives each new
connection to one of them by a hash of its addresses. Load sent over one connection therefore
reaches one process only, and a few connections spread it unevenly: a generator that does not
look measures one process with idle company. :func:`listeners` finds the processes that accept
on a port and :func:`owners` which of them holds each connection, by the client's port, so that
:class:`~loadtests.client.ScoringClient` can keep an equal number of connections on each.

Linux only (``/proc/net/tcp*`` and ``/proc/PID/fd``); on any error the answers are empty and the
caller goes on without spreading.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Final

_PROC: Final = Path("/proc")
_ESTABLISHED: Final = "01"
_LISTEN: Final = "0A"


def _sockets(port: int) -> Iterator[tuple[str, int, int]]:
    """``(state, remote port, inode)`` of every TCP socket whose local port is ``port``."""
    for table in ("tcp", "tcp6"):
        try:
            lines = (_PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            if int(local.rsplit(":", 1)[1], 16) == port:
                yield state, int(remote.rsplit(":", 1)[1], 16), int(inode)


def _socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets ``pid`` has open (empty when its fds cannot be read)."""
    inodes = set()
    try:
        for fd in (_PROC / str(pid) / "fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:
        pass
    return inodes


def _pids() -> list[int]:
    return [int(p.name) for p in _PROC.iterdir() if p.name.isdigit()]


def listeners(port: int) -> list[int]:
    """Pids of the processes listening on ``port`` (each its own socket under SO_REUSEPORT)."""
    listening = {inode for state, _, inode in _sockets(port) if state == _LISTEN}
    if not listening:
        return []
    return sorted(pid for pid in _pids() if _socket_inodes(pid) & listening)


def owners(port: int, pids: list[int]) -> dict[int, int]:
    """``{client port: pid}``: which of ``pids`` holds the accepted end of each established
    connection to ``port``."""
    by_inode = {inode: remote for state, remote, inode in _sockets(port) if state == _ESTABLISHED}
    found: dict[int, int] = {}
    for pid in pids:
        for inode in _socket_inodes(pid) & by_inode.keys():
            found[by_inode[inode]] = pid
    return found
