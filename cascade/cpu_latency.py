"""Keep this machine's cores out of deep idle while latency matters (Linux PM QoS).

On a virtual machine whose idle cores halt (``haltpoll.guest_halt_poll_ns=0``, how this
project's VMs boot), every hop of a call wakes a halted core: the host must schedule that vCPU
again, and until it does the time counts as *steal*. On a busy host that wait dominates: at 300/s
the host took 45-47% of the time our cores wanted to run (``cascade loadtest``'s "stolen by the
host" column), against 2-3% with the cores kept awake (docs/latency.md, tenth run).

:class:`CpuLatencyHold` is the kernel's own interface for this (what ``tuned``'s
``latency-performance`` profile does): it writes the largest wake-up latency the caller accepts
to ``/dev/cpu_dma_latency`` and keeps the file open; cpuidle then picks no state slower to leave
(0 µs: the cores poll instead of halting). Closing the file, or the process ending, withdraws the
request. A polling core is busy for the host, so it costs the host's CPU while held: an opt-in for
the measured path, not a default. Writing needs root (or the device's permission); without it the
hold says why and changes nothing.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from types import TracebackType
from typing import Final, Self

__all__ = ["CPU_DMA_LATENCY", "CpuLatencyHold"]

CPU_DMA_LATENCY: Final = Path("/dev/cpu_dma_latency")


class CpuLatencyHold:
    """While entered, asks that no core take longer than ``max_us`` µs to wake (sync context
    manager; ``held`` says whether the request took, ``problem`` why not)."""

    def __init__(self, max_us: int, device: Path | None = None) -> None:
        if not 0 <= max_us <= 2**31 - 1:
            raise ValueError(f"max_us must be 0..{2**31 - 1} µs, not {max_us}")
        self.max_us: Final = max_us
        self._device = CPU_DMA_LATENCY if device is None else device
        self._fd: int | None = None
        self.problem = ""
        """Why the request did not take ('' while held or before entering)."""

    @property
    def held(self) -> bool:
        """Whether the request is in force now."""
        return self._fd is not None

    def __enter__(self) -> Self:
        try:
            fd = os.open(self._device, os.O_WRONLY)
        except OSError as exc:
            self.problem = f"cannot open {self._device}: {exc.strerror or exc}"
            return self
        try:
            os.write(fd, struct.pack("=i", self.max_us))
        except OSError as exc:
            os.close(fd)
            self.problem = f"cannot write {self._device}: {exc.strerror or exc}"
            return self
        self._fd, self.problem = fd, ""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # the kernel drops the request with the last open file
