"""The errors of the managed server processes, a branch of :class:`cascade.errors.CascadeError`.

Exception tree::

    CascadeError
    └── ServerError
        ├── ServerBinaryNotFoundError   the executable is not installed where we look
        └── ServerStartError            the process died, or was not ready before its timeout
"""

from __future__ import annotations

from cascade.errors import CascadeError


class ServerError(CascadeError, RuntimeError):
    """Base class of every error raised by ``devstack.servers``."""


class ServerBinaryNotFoundError(ServerError):
    """The server's executable is not installed (names every place that was searched)."""


class ServerStartError(ServerError):
    """The server exited, or did not become ready in time; the message ends with its log tail."""
