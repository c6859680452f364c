"""Shared fixtures for the integration tests: real Redis, NATS and Triton on free loopback ports.

Session-scoped servers (``redis_server``, ``nats_server``, ``triton_server``) start once per test
run and always stop at its end; their logs go to ``server_log_dir``. ``tiny_heavy_onnx`` builds a
small ONNX file with the heavy stage's tensor contract, so no trained model is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

import numpy as np
import onnx
import pytest
import pytest_asyncio
from onnx import TensorProto, helper, numpy_helper

from cascade.features import SEQUENCE_LEN, TOKEN_DIM
from devstack.servers import NatsServer, RedisServer, TritonServer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

SEQ_LEN: Final = SEQUENCE_LEN
TINY_TOKEN_DIM: Final = TOKEN_DIM  # the feature set's width, so the orchestrator's tensors fit


def build_tiny_heavy_onnx(
    path: Path, token_dim: int = TINY_TOKEN_DIM, seq_len: int = SEQ_LEN
) -> Path:
    """Write ``score = sigmoid(mean over sequence and tokens of (sequence * w))`` to ``path``.

    Input ``sequence`` float32 [N, seq_len, token_dim] (dynamic N), output ``score`` float32
    [N, 1], opset 17. ``w`` is a fixed ramp so that each token position matters differently.
    """
    weights = numpy_helper.from_array(np.linspace(-1.0, 2.0, token_dim, dtype=np.float32), name="w")
    nodes = [
        helper.make_node("Mul", ["sequence", "w"], ["weighted"]),
        helper.make_node("ReduceMean", ["weighted"], ["per_step"], axes=[2], keepdims=0),
        helper.make_node("ReduceMean", ["per_step"], ["mean"], axes=[1], keepdims=1),
        helper.make_node("Sigmoid", ["mean"], ["score"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_heavy",
        [
            helper.make_tensor_value_info(
                "sequence", TensorProto.FLOAT, ["batch", seq_len, token_dim]
            )
        ],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])],
        initializer=[weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


class TinyHeavyOnnx(Protocol):
    """Builds (once per argument set) a tiny heavy-stage ONNX file and returns its path."""

    def __call__(self, token_dim: int = TINY_TOKEN_DIM, seq_len: int = SEQ_LEN) -> Path: ...


@pytest.fixture(scope="session")
def server_log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for every server log of this test run (kept by pytest for inspection)."""
    return tmp_path_factory.mktemp("server-logs")


@pytest.fixture(scope="session")
def tiny_heavy_onnx(tmp_path_factory: pytest.TempPathFactory) -> TinyHeavyOnnx:
    """Factory: ``tiny_heavy_onnx(token_dim=TOKEN_DIM, seq_len=65) -> Path``, built once each."""
    root = tmp_path_factory.mktemp("tiny-heavy")
    built: dict[tuple[int, int], Path] = {}

    def factory(token_dim: int = TINY_TOKEN_DIM, seq_len: int = SEQ_LEN) -> Path:
        key = (token_dim, seq_len)
        if key not in built:
            built[key] = build_tiny_heavy_onnx(
                root / f"d{token_dim}-s{seq_len}" / "model.onnx", token_dim, seq_len
            )
        return built[key]

    return factory


@pytest_asyncio.fixture(scope="session")
async def redis_server(server_log_dir: Path) -> AsyncIterator[RedisServer]:
    """A redis-server for the whole test run (``.url``); tests should use their own keys."""
    async with RedisServer(log_dir=server_log_dir / "redis") as server:
        yield server


@pytest_asyncio.fixture(scope="session")
async def nats_server(server_log_dir: Path) -> AsyncIterator[NatsServer]:
    """A nats-server with JetStream for the whole test run (``.url``)."""
    async with NatsServer(
        jetstream=True, store_dir=server_log_dir / "jetstream", log_dir=server_log_dir / "nats"
    ) as server:
        yield server


@pytest_asyncio.fixture(scope="session")
async def triton_server(
    tiny_heavy_onnx: TinyHeavyOnnx, server_log_dir: Path
) -> AsyncIterator[TritonServer]:
    """Triton serving the tiny heavy model as ``fraud_heavy`` v1, no delay (``.grpc_url``)."""
    async with TritonServer(tiny_heavy_onnx(), log_dir=server_log_dir / "triton") as server:
        yield server


def process_table() -> list[tuple[int, str, int, int]]:
    """``(pid, state, ppid, pgrp)`` of every process now, from /proc (state ``Z``: a zombie)."""
    table = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command: state, ppid, pgrp, ...
        state, ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        table.append((int(entry.name), state, int(ppid), int(pgrp)))
    return table


def live_descendants(pid: int) -> set[int]:
    """Every process below ``pid`` now (children, their children, ...) that is not a zombie."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for child, _state, parent, _pgrp in table:
        children.setdefault(parent, []).append(child)
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.add(child)
            todo.append(child)
    return found & live_processes(table)


def live_processes(table: list[tuple[int, str, int, int]] | None = None) -> set[int]:
    """Pids of ``table`` (default: now) that are not zombies."""
    rows = process_table() if table is None else table
    return {pid for pid, state, _ppid, _pgrp in rows if state != "Z"}


def processes_mentioning(folder: Path) -> set[int]:
    """Pids whose command line names ``folder`` (a run folder a test gave the stack)."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(folder) in cmdline:
            pids.add(int(proc.name))
    return pids
