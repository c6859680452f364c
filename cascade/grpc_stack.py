"""Which of gRPC's TCP stacks our Python servers use: set before anything imports grpc.

gRPC's EventEngine stack reads every call's bytes on one of four EventEngine threads and then
hands them to the completion-queue thread and on to the event loop (about one extra context
switch per call on each). The iomgr stack does not. Measured at 300/s, side by side with the
EventEngine stack in one run, three times: 0.93x, 0.83x and 0.99x the orchestrator's CPU per
answer (separate runs vary by more than that on this VM). An operator's own ``GRPC_EXPERIMENTS``
wins. This module imports nothing of gRPC's, so that it can be imported first::

    import os

    from cascade.grpc_stack import GRPC_EXPERIMENTS_DEFAULT

    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS_DEFAULT)
"""

from __future__ import annotations

from typing import Final

GRPC_EXPERIMENTS_DEFAULT: Final = "-event_engine_listener,-event_engine_for_all_other_endpoints"
