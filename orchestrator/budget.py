"""The latency budget of one Score call.

``budget = min(caller's deadline, configured SLO) - response margin``. Every downstream call is
given at most what remains (and at most its own cap), so no answer is later than the caller's
deadline. Time is read from the event loop's monotonic clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from cascade.settings import BudgetSettings


@dataclass(frozen=True, slots=True)
class Budget:
    """A deadline on the monotonic clock, and the total it was built with."""

    deadline_s: float
    total_ms: float
    caller_left_ms: float | None = None
    """What the caller's deadline had left when the budget started (None: it set none)."""

    @classmethod
    def start(
        cls, caller_remaining_s: float | None, settings: BudgetSettings, *, batch: bool = False
    ) -> Budget:
        """Budget for a call whose caller has ``caller_remaining_s`` left (None: no deadline)."""
        limit_ms = settings.batch_slo_ms if batch else settings.slo_ms
        if caller_remaining_s is not None:
            limit_ms = min(limit_ms, caller_remaining_s * 1000.0)
        total_ms = max(0.0, limit_ms - settings.response_margin_ms)
        caller_left_ms = None if caller_remaining_s is None else caller_remaining_s * 1000.0
        return cls(
            deadline_s=time.monotonic() + total_ms / 1000.0,
            total_ms=total_ms,
            caller_left_ms=caller_left_ms,
        )

    def remaining_ms(self) -> float:
        """Milliseconds left (never negative)."""
        return max(0.0, (self.deadline_s - time.monotonic()) * 1000.0)

    def allot_s(self, cap_ms: float, *, keep_ms: float = 0.0) -> float:
        """Seconds a downstream call may take: at most ``cap_ms``, leaving ``keep_ms`` unspent."""
        return max(0.0, min(cap_ms, self.remaining_ms() - keep_ms)) / 1000.0

    def capped_s(self, cap_ms: float) -> tuple[float, float]:
        """A stage's timeout (at most ``cap_ms``) and its grace: the rest of the budget past
        it, for when this process itself was away as the cap ran out
        (:mod:`orchestrator.expiry`)."""
        left_ms = self.remaining_ms()
        timeout_ms = min(cap_ms, left_ms)
        return timeout_ms / 1000.0, (left_ms - timeout_ms) / 1000.0
