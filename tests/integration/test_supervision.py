"""``ChildSupervisor`` over real (tiny) processes: a killed one comes back with the backoff and a
count, one stopped on purpose stays stopped, a failed restart is retried, and leaving the block
ends every watch task."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from devstack.servers import ManagedProcess
from devstack.supervision import Backoff, ChildSupervisor, RestartEvent

pytestmark = pytest.mark.integration

FAST = Backoff(initial_s=0.05, factor=2.0, max_s=0.4, reset_after_s=60.0)


def sleeper(log_dir: Path, name: str = "sleeper") -> ManagedProcess:
    return ManagedProcess(name, ["sleep", "60"], log_dir=log_dir, stop_grace_s=1.0)


async def until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while True:  # polled: the condition is another process's state
            if predicate():
                return
            await asyncio.sleep(0.01)


async def test_a_killed_child_is_restarted_and_counted(tmp_path: Path) -> None:
    events: list[RestartEvent] = []
    async with sleeper(tmp_path) as child, ChildSupervisor([child], FAST, events.append) as sup:
        first = child.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await until(lambda: len(events) == 1)
        assert child.running and child.pid != first
        assert events[0].child == "sleeper"
        assert events[0].exit_status == -signal.SIGKILL
        assert events[0].restart_number == 1 and events[0].delay_s == pytest.approx(0.05)
        second = child.pid
        assert second is not None
        os.kill(second, signal.SIGKILL)  # again, soon: the backoff doubles
        await until(lambda: len(events) == 2)
        assert events[1].delay_s == pytest.approx(0.1)
        assert sup.restarts == {"sleeper": 2} and sup.total_restarts == 2
    assert not child.running


async def test_a_child_stopped_on_purpose_is_not_restarted(tmp_path: Path) -> None:
    async with sleeper(tmp_path) as child, ChildSupervisor([child], FAST) as sup:
        await child.stop()
        await asyncio.sleep(0.3)
        assert not child.running
        assert sup.total_restarts == 0


async def test_leaving_the_block_cancels_the_watches_and_nothing_restarts(tmp_path: Path) -> None:
    children = [sleeper(tmp_path, f"sleeper-{i}") for i in range(3)]
    for child in children:
        await child.start()
    try:
        sup = ChildSupervisor(children, FAST)
        async with sup:
            tasks = {t for t in asyncio.all_tasks() if t.get_name().startswith("supervise-")}
            assert len(tasks) == 3
        assert all(t.done() for t in tasks)
        pid = children[0].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(0.3)
        assert not children[0].running and sup.total_restarts == 0
    finally:
        for child in children:
            await child.stop()


async def test_a_failed_restart_backs_off_and_tries_again(tmp_path: Path) -> None:
    # Ready only once a flag file exists: the first restart times out, a later one succeeds.
    flag = tmp_path / "ready"

    async def probe() -> bool:
        return flag.exists()

    child = ManagedProcess(
        "flaky", ["sleep", "60"], log_dir=tmp_path, probe=probe, start_timeout_s=0.2
    )
    flag.touch()
    events: list[RestartEvent] = []
    async with child, ChildSupervisor([child], FAST, events.append):
        flag.unlink()
        pid = child.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await until(lambda: len(events) >= 1)
        assert events[0].ready_at is None and "not ready" in events[0].error
        flag.touch()
        t0 = time.monotonic()
        await until(lambda: any(e.ready_at is not None for e in events))
        assert time.monotonic() - t0 < 2.0
        assert child.running
        assert [e.delay_s for e in events[:2]] == pytest.approx([0.05, 0.1])
