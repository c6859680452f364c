"""Log lines for events that a caller can repeat at will: at most one line per interval.

A stream of bad requests must not become a stream of log lines (5,000 undecodable bodies once
wrote 34,454 of them, tracebacks included). :class:`ThrottledLog` counts every event and writes one
line per ``interval_s`` at most, saying how many events it stands for; the exact figures belong in
metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

DEFAULT_INTERVAL_S: Final = 10.0


class ThrottledLog:
    """Writes ``event`` calls to ``logger`` at ``level``, one line per ``interval_s`` at most.

    The first event logs at once; events within the next ``interval_s`` are only counted, and the
    first event after it logs again with the count since the previous line (itself included). A
    burst's tail is therefore reported with the next event, not on a timer: no task to own.
    Not thread-safe: meant for one event loop's callbacks.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._level = level
        self._clock = clock
        self._pending = 0
        self._last_line_at: float | None = None

    def event(self, message: str, *args: object) -> None:
        """Count one event; log ``message % args`` with the count when the interval allows."""
        self._pending += 1
        now = self._clock()
        last = self._last_line_at
        if last is not None and now - last < self._interval_s:
            return
        count, self._pending = self._pending, 0
        self._last_line_at = now
        self._logger.log(
            self._level,
            message + "; %d since the last such line (one line per %.0f s at most)",
            *args,
            count,
            self._interval_s,
        )
