"""One updating progress line on stderr while a step runs.

:func:`format_progress` is pure; :class:`ProgressLine` is the async context manager that owns the
redraw task (a few times a second), rewrites the line in place with ``\\r`` and ends it with a
newline on exit. When stderr is not a terminal it stays silent, so CI logs are not flooded.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Final, TextIO

__all__ = ["ProgressLine", "format_progress"]

_REDRAW_EVERY_S: Final = 0.25


def format_progress(
    label: str, elapsed_s: float, window_s: float, counts: Mapping[str, int]
) -> str:
    """``label  3.2/10s  sent 640/2000  ok 636  err 0  timeout 0  in flight 4  199/s``."""
    sent = counts.get("sent", 0)
    ok = counts.get("ok", 0)
    errors = counts.get("errors", 0)
    timeouts = counts.get("timeouts", 0)
    in_flight = max(0, sent - ok - errors - timeouts)
    rate = ok / elapsed_s if elapsed_s > 0 else 0.0
    parts = [
        f"{label}",
        f"{min(elapsed_s, 9999):5.1f}/{window_s:.0f}s",
        f"sent {sent}/{counts.get('scheduled', 0)}",
        f"ok {ok}",
        f"err {errors}",
        f"timeout {timeouts}",
        f"in flight {in_flight}",
        f"{rate:.0f}/s",
    ]
    if counts.get("unsent"):
        parts.append(f"UNSENT {counts['unsent']}")
    return "  ".join(parts)


class ProgressLine:
    """Redraws ``format_progress(label, ..., snapshot())`` on ``stream`` until the block ends."""

    def __init__(
        self,
        label: str,
        window_s: float,
        snapshot: Callable[[], Mapping[str, int]],
        *,
        stream: TextIO | None = None,
        enabled: bool | None = None,
    ) -> None:
        self._label = label
        self._window_s = window_s
        self._snapshot = snapshot
        self._stream = stream if stream is not None else sys.stderr
        self._enabled = self._stream.isatty() if enabled is None else enabled
        self._task: asyncio.Task[None] | None = None
        self._started = 0.0

    def _draw(self) -> None:
        line = format_progress(
            self._label, time.monotonic() - self._started, self._window_s, self._snapshot()
        )
        self._stream.write("\r" + line + "\x1b[K")
        self._stream.flush()

    async def _run(self) -> None:
        while True:
            self._draw()
            await asyncio.sleep(_REDRAW_EVERY_S)

    async def __aenter__(self) -> ProgressLine:
        self._started = time.monotonic()
        if self._enabled:
            self._task = asyncio.create_task(self._run(), name=f"progress-{self._label}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self._draw()
        self._stream.write("\n")
        self._stream.flush()
