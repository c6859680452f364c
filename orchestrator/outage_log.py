"""One log line when a dependency starts failing and one when it answers again.

The scoring path turns every dependency failure into a labelled answer and logs nothing per
call (at hundreds of calls per second that would be the log); without this an outage of Redis,
the workers or Triton left no trace in the orchestrator's log. :class:`OutageLog` keeps two
fields per dependency and logs only transitions: the first failure after a success (with the
error), and the first success after failures (with how long and how many). A dependency that
flaps logs at most one "failing" line per ``quiet_s``.
"""

from __future__ import annotations

import logging
import time
from typing import Final

__all__ = ["OutageLog"]

logger = logging.getLogger(__name__)

_QUIET_S: Final = 5.0


class OutageLog:
    """Transitions of one dependency (``what``) between answering and failing."""

    __slots__ = ("_failures", "_last_logged", "_quiet_s", "_since", "_what")

    def __init__(self, what: str, *, quiet_s: float = _QUIET_S) -> None:
        self._what = what
        self._quiet_s = quiet_s
        self._failures = 0
        self._since = 0.0
        self._last_logged = float("-inf")

    def failed(self, error: Exception) -> None:
        """A call to the dependency failed with ``error``."""
        if self._failures == 0:
            now = time.monotonic()
            self._since = now
            if now - self._last_logged >= self._quiet_s:
                self._last_logged = now
                logger.warning("%s failing: %s (answers are labelled)", self._what, error)
        self._failures += 1

    def answered(self) -> None:
        """A call to the dependency succeeded."""
        if self._failures:
            if self._last_logged >= self._since:  # its start was logged: log its end too
                logger.warning(
                    "%s answers again after %.2f s (%d failed calls)",
                    self._what,
                    time.monotonic() - self._since,
                    self._failures,
                )
            self._failures = 0
