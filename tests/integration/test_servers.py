"""The real server processes: each starts on a free port, answers, and is gone after its block.

Also: a start failure quotes the log; a body that raises or is cancelled still stops the server;
Triton scores the tiny heavy model exactly as ONNX Runtime does, batches concurrent requests, and
honours ``delay_ms``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shutil
import sys
import time
import types
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
import tritonclient.grpc.aio as grpcclient
from nats.js.api import StreamConfig

from cascade.features import TOKEN_DIM
from cascade.settings import REPO_ROOT
from devstack.servers import (
    ManagedProcess,
    NatsCluster,
    NatsServer,
    RedisClusterServers,
    RedisServer,
    ServerStartError,
    TritonServer,
    free_port,
)
from devstack.servers._process import tcp_exchange
from devstack.servers.nats import find_nats_server
from devstack.servers.triton import ModelContractError
from tests.integration.conftest import process_table

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from nats.aio.msg import Msg

    TinyHeavyOnnx = Callable[..., Path]

pytestmark = pytest.mark.integration

MODEL = "fraud_heavy"
SLOW_DELAY_MS = 50.0


def process_exists(pid: int) -> bool:
    """True while ``pid`` names a process (a zombie counts: it has not been reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def live_group_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not zombies (a killed orphan waits for init to reap)."""
    return [pid for pid, state, _ppid, pgrp in process_table() if pgrp == pgid and state != "Z"]


async def wait_group_dead(pgid: int, timeout_s: float = 2.0) -> list[int]:
    """Wait until group ``pgid`` has no live member (signals are delivered asynchronously)."""
    for _ in range(int(timeout_s / 0.02)):
        if not live_group_members(pgid):
            break
        await asyncio.sleep(0.02)
    return live_group_members(pgid)


def sequences(batch: int, token_dim: int, seed: int = 0) -> npt.NDArray[np.float32]:
    """Random ``sequence`` input of shape [batch, 65, token_dim]."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, 65, token_dim)).astype(np.float32)


def onnx_scores(onnx_path: Path, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The reference answer: the same ONNX file run directly with ONNX Runtime."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["score"], {"sequence": batch})[0], dtype=np.float32)


async def triton_scores(
    client: grpcclient.InferenceServerClient, batch: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    """Score ``batch`` through Triton's gRPC API."""
    infer_input = grpcclient.InferInput("sequence", list(batch.shape), "FP32")
    infer_input.set_data_from_numpy(batch)
    result = await client.infer(
        MODEL, [infer_input], outputs=[grpcclient.InferRequestedOutput("score")], client_timeout=10
    )
    return np.asarray(result.as_numpy("score"), dtype=np.float32)


def metric(metrics_text: str, name: str) -> float:
    """The value of ``name`` for model ``fraud_heavy`` in Prometheus text format."""
    pattern = rf'^{name}\{{[^}}]*model="{MODEL}"[^}}]*\}} ([0-9.e+]+)$'
    match = re.search(pattern, metrics_text, re.MULTILINE)
    assert match is not None, f"{name} not in metrics"
    return float(match.group(1))


def read_metrics(url: str) -> str:
    """GET Triton's Prometheus endpoint."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text: str = response.read().decode()
        return text


# --- Redis ---------------------------------------------------------------------------------------


async def test_redis_answers_on_its_port_and_is_gone_after(server_log_dir: Path) -> None:
    async with RedisServer(log_dir=server_log_dir) as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        pid = server.pid
        assert pid is not None
        assert process_exists(pid)
        client = aioredis.Redis.from_url(server.url)
        try:
            assert await client.set("k", "v")
            assert await client.get("k") == b"v"
        finally:
            await client.aclose()
    assert not process_exists(pid)


async def test_redis_is_stopped_when_the_body_raises(server_log_dir: Path) -> None:
    server = RedisServer(log_dir=server_log_dir)
    with pytest.raises(RuntimeError, match="boom"):
        async with server:
            raise RuntimeError("boom")
    assert server.pid is not None
    assert not process_exists(server.pid)


async def test_redis_is_stopped_when_the_body_is_cancelled(server_log_dir: Path) -> None:
    server = RedisServer(log_dir=server_log_dir)
    entered = asyncio.Event()

    async def hold() -> None:
        async with server:
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(hold())
    await asyncio.wait_for(entered.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert server.pid is not None
    assert not process_exists(server.pid)


async def test_a_taken_port_is_refused_before_starting(
    redis_server: RedisServer, server_log_dir: Path
) -> None:
    clash = RedisServer(port=redis_server.port, log_dir=server_log_dir)
    with pytest.raises(ServerStartError, match=f"port {redis_server.port} .* already in use"):
        await clash.start()
    assert clash.pid is None
    assert await redis_server.ping()


async def test_a_process_that_exits_raises_with_its_log_tail(server_log_dir: Path) -> None:
    broken = RedisServer(log_dir=server_log_dir, extra_args=("--no-such-directive", "1"))
    with pytest.raises(ServerStartError, match=r"(?s)exited with status 1.*no-such-directive"):
        await broken.start()
    assert broken.pid is not None
    assert not process_exists(broken.pid)


async def test_a_server_not_ready_in_time_is_killed(server_log_dir: Path) -> None:
    async def never() -> bool:
        return False

    process = ManagedProcess(
        "sleeper", ["sleep", "60"], log_dir=server_log_dir, probe=never, start_timeout_s=0.3
    )
    started = time.monotonic()
    with pytest.raises(ServerStartError, match=r"not ready after 0\.3 s"):
        await process.start()
    assert time.monotonic() - started < 5
    assert process.pid is not None
    assert not process_exists(process.pid)


async def test_a_process_ignoring_sigterm_is_killed_with_its_children(
    server_log_dir: Path,
) -> None:
    # The shell ignores SIGTERM, and so does its background child: only SIGKILL ends them.
    script = "trap '' TERM; sleep 60 & wait"
    process = ManagedProcess(
        "stubborn", ["sh", "-c", script], log_dir=server_log_dir, stop_grace_s=0.5
    )
    async with process:
        await asyncio.sleep(0.2)
        assert process.pid is not None
        assert len(live_group_members(process.pid)) == 2
    assert process.returncode == -9
    assert await wait_group_dead(process.pid) == []


# --- NATS ----------------------------------------------------------------------------------------


async def test_jetstream_reserves_streams_beyond_three_quarters_of_the_free_disk(
    server_log_dir: Path,
) -> None:
    # Auto-sized, the file store would be 75% of the free disk, and a stream reserving the whole
    # free disk would be refused (the decision log's 8 GiB streams were, on a fuller disk).
    async with NatsServer(log_dir=server_log_dir, jetstream=True) as server:
        assert server.store_dir is not None
        await _assert_a_stream_reserves_the_whole_free_disk(server.url, server.store_dir)


async def _assert_a_stream_reserves_the_whole_free_disk(url: str, store_dir: Path) -> None:
    free = shutil.disk_usage(store_dir).free
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        await js.add_stream(StreamConfig(name="RESERVE", subjects=["reserve.>"], max_bytes=free))
        assert (await js.stream_info("RESERVE")).config.max_bytes == free
    finally:
        await client.close()


async def test_the_compose_nats_config_reserves_streams_beyond_three_quarters_of_the_free_disk(
    server_log_dir: Path, tmp_path: Path
) -> None:
    """``deploy/nats.conf`` as compose runs it (``-c ... -js -sd DIR``), on a loopback port."""
    port = free_port()
    store = tmp_path / "jetstream"
    conf = REPO_ROOT / "deploy" / "nats.conf"
    argv = [str(find_nats_server()), "-c", str(conf), "-js", "-sd", str(store)]
    process = ManagedProcess(
        "nats-compose-conf",
        [*argv, "-a", "127.0.0.1", "-p", str(port)],
        log_dir=server_log_dir,
        probe=lambda: tcp_exchange("127.0.0.1", port, b"", b"INFO "),
        ports=(port,),
    )
    async with process:
        await _assert_a_stream_reserves_the_whole_free_disk(f"nats://127.0.0.1:{port}", tmp_path)


async def test_nats_request_reply_and_gone_after(server_log_dir: Path) -> None:
    async with NatsServer(log_dir=server_log_dir, monitor_port=0) as server:
        assert server.url == f"nats://127.0.0.1:{server.port}"
        assert server.monitor_url is not None
        pid = server.pid
        assert pid is not None
        if "GOMAXPROCS" not in os.environ:  # the local stack's Go runtime gets one processor
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert b"GOMAXPROCS=1" in environ
        client = await nats.connect(server.url)
        try:

            async def echo(msg: Msg) -> None:
                await msg.respond(b"re:" + msg.data)

            await client.subscribe("echo", cb=echo)
            reply = await client.request("echo", b"hi", timeout=2)
            assert reply.data == b"re:hi"
        finally:
            await client.close()
    assert not process_exists(pid)


async def test_nats_fixture_has_jetstream(nats_server: NatsServer) -> None:
    client = await nats.connect(nats_server.url)
    try:
        info = await client.jetstream().account_info()
        assert info.streams >= 0
    finally:
        await client.close()


async def test_nats_is_stopped_when_the_body_raises(server_log_dir: Path) -> None:
    server = NatsServer(log_dir=server_log_dir)
    with pytest.raises(KeyError):
        async with server:
            raise KeyError("boom")
    assert server.pid is not None
    assert not process_exists(server.pid)


# --- Clusters ------------------------------------------------------------------------------------


async def test_nats_cluster_routes_between_nodes_keeps_3_replicas_and_is_gone_after(
    server_log_dir: Path,
) -> None:
    async with NatsCluster(log_dir=server_log_dir / "nats-cluster") as cluster:
        pids = [node.pid for node in cluster.nodes]
        urls = cluster.url.split(",")
        assert len(urls) == 3
        responder = await nats.connect(urls[0])
        requester = await nats.connect(urls[2])
        try:

            async def echo(msg: Msg) -> None:
                await msg.respond(b"re:" + msg.data)

            await responder.subscribe("echo", cb=echo)
            await responder.flush()
            assert [await cluster.routed_peers(i) for i in range(3)] == [2, 2, 2]  # a full mesh
            # Over the routes; the subscription's interest reaches node 2 a moment later.
            async with asyncio.timeout(5):
                while True:
                    try:
                        reply = await requester.request("echo", b"hi", timeout=2)
                        break
                    except nats.errors.NoRespondersError:
                        await asyncio.sleep(0.05)
            assert reply.data == b"re:hi"
            js = requester.jetstream()
            info = await js.add_stream(StreamConfig(name="R3", subjects=["r3.>"], num_replicas=3))
            assert info.config.num_replicas == 3
            # The new stream elects its own leader a moment after it is created; until then a
            # publish finds no responder (seen once in CI on a busy machine).
            async with asyncio.timeout(10):
                while True:
                    try:
                        ack = await js.publish("r3.x", b"kept", timeout=2)
                        break
                    except nats.js.errors.NoStreamResponseError:
                        await asyncio.sleep(0.05)
            assert ack.seq == 1
        finally:
            await requester.close()
            await responder.close()
    assert not any(pid is not None and process_exists(pid) for pid in pids)


async def test_redis_cluster_has_3_masters_with_a_replica_each_and_is_gone_after(
    server_log_dir: Path,
) -> None:
    async with RedisClusterServers(log_dir=server_log_dir / "redis-cluster") as cluster:
        assert len(cluster.url.split(",")) == 6
        # Master i serves the i-th third of the slots; node 3 + i follows it.
        assert [await cluster.master_of(slot) for slot in (0, 8000, 16383)] == [0, 1, 2]
        for i in range(3):
            client = cluster.client(3 + i)
            try:
                replication = await client.info("replication")
            finally:
                await client.aclose()
            assert replication["role"] == "slave"
            assert replication["master_port"] == cluster.nodes[i].port
    assert not any(node.pid is not None and process_exists(node.pid) for node in cluster.nodes)


# --- Triton --------------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def slow_triton(
    tiny_heavy_onnx: TinyHeavyOnnx, server_log_dir: Path
) -> AsyncIterator[TritonServer]:
    """Triton whose model sleeps ``SLOW_DELAY_MS`` per batch."""
    async with TritonServer(
        tiny_heavy_onnx(), log_dir=server_log_dir, delay_ms=SLOW_DELAY_MS
    ) as server:
        yield server


@pytest.mark.parametrize("batch", [1, 8])
async def test_triton_scores_like_onnxruntime(
    triton_server: TritonServer, tiny_heavy_onnx: TinyHeavyOnnx, batch: int
) -> None:
    data = sequences(batch, token_dim=TOKEN_DIM, seed=batch)
    async with grpcclient.InferenceServerClient(triton_server.grpc_url) as client:
        assert await client.is_model_ready(MODEL)
        got = await triton_scores(client, data)
    assert got.shape == (batch, 1)
    np.testing.assert_allclose(got, onnx_scores(tiny_heavy_onnx(), data), rtol=1e-6, atol=1e-7)


async def test_triton_rejects_a_wrong_shape(triton_server: TritonServer) -> None:
    async with grpcclient.InferenceServerClient(triton_server.grpc_url) as client:
        with pytest.raises(grpcclient.InferenceServerException, match="shape"):
            await triton_scores(client, sequences(2, token_dim=5))
        # and keeps serving
        assert (await triton_scores(client, sequences(1, token_dim=TOKEN_DIM))).shape == (1, 1)


async def test_triton_exposes_prometheus_metrics(triton_server: TritonServer) -> None:
    text = await asyncio.to_thread(read_metrics, triton_server.metrics_url)
    assert "nv_inference_count" in text


async def test_triton_honours_delay_ms(slow_triton: TritonServer) -> None:
    async with grpcclient.InferenceServerClient(slow_triton.grpc_url) as client:
        data = sequences(1, token_dim=TOKEN_DIM)
        await triton_scores(client, data)
        for _ in range(3):
            started = time.perf_counter()
            await triton_scores(client, data)
            assert (time.perf_counter() - started) * 1000 >= SLOW_DELAY_MS


async def test_triton_batches_concurrent_requests(
    slow_triton: TritonServer, tiny_heavy_onnx: TinyHeavyOnnx
) -> None:
    await asyncio.sleep(0.1)  # let statistics of earlier calls land before the baseline
    before = await asyncio.to_thread(read_metrics, slow_triton.metrics_url)
    data = [sequences(1, token_dim=TOKEN_DIM, seed=i) for i in range(64)]
    async with grpcclient.InferenceServerClient(slow_triton.grpc_url) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(triton_scores(client, d) for d in data))
        elapsed_ms = (time.perf_counter() - started) * 1000
    # Triton records a batch's statistics just after sending its responses: wait for the last one.
    for _ in range(100):
        after = await asyncio.to_thread(read_metrics, slow_triton.metrics_url)
        requests = metric(after, "nv_inference_count") - metric(before, "nv_inference_count")
        if requests >= 64:
            break
        await asyncio.sleep(0.02)
    executions = metric(after, "nv_inference_exec_count") - metric(
        before, "nv_inference_exec_count"
    )
    assert requests == 64
    # One execution per batch: far fewer than requests, and far less than 64 x 50 ms in all.
    assert executions <= 16, f"{executions} executions for 64 requests"
    assert elapsed_ms < 64 * SLOW_DELAY_MS / 4
    # Each request got its own row back, not a neighbour's.
    expected = onnx_scores(tiny_heavy_onnx(), np.concatenate(data))
    np.testing.assert_allclose(np.concatenate(results), expected, rtol=1e-6, atol=1e-7)


async def test_triton_is_stopped_with_its_stubs_when_the_body_raises(
    tiny_heavy_onnx: TinyHeavyOnnx, server_log_dir: Path
) -> None:
    server = TritonServer(tiny_heavy_onnx(), log_dir=server_log_dir)

    async def use_and_fail() -> None:
        async with server:
            assert await server.ready()
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await use_and_fail()
    assert server.pid is not None
    assert not process_exists(server.pid)
    assert await wait_group_dead(server.pid) == []


async def test_triton_refuses_an_onnx_without_the_contract(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "wrong",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "wrong.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelContractError, match="needs input 'sequence'"):
        await TritonServer(path, work_dir=tmp_path / "work").start()


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


async def test_a_start_cancelled_while_waiting_kills_the_process(server_log_dir: Path) -> None:
    async def never() -> bool:
        return False

    process = ManagedProcess(
        "cancelled", ["sleep", "60"], log_dir=server_log_dir, probe=never, start_timeout_s=60
    )
    task = asyncio.create_task(process.start())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert process.pid is not None
    assert not process_exists(process.pid)


# --- The Python-backend model, driven without Triton ---------------------------------------------


class _FakeTensor:
    def __init__(self, name: str, array: npt.NDArray[np.float32]) -> None:
        self.name = name
        self.array = array

    def as_numpy(self) -> npt.NDArray[np.float32]:
        return self.array


class _FakeResponse:
    def __init__(self, output_tensors: list[_FakeTensor], error: _FakeError | None = None) -> None:
        self.output_tensors = output_tensors
        self.error = error


class _FakeError:
    def __init__(self, message: str) -> None:
        self.message = message


class _FakeRequest:
    def __init__(self, tensors: dict[str, npt.NDArray[np.float32]]) -> None:
        self.tensors = tensors


def _fake_pb_utils() -> types.ModuleType:
    """The parts of ``triton_python_backend_utils`` that ``model.py`` uses."""
    module = types.ModuleType("triton_python_backend_utils")

    def get_input_tensor_by_name(request: _FakeRequest, name: str) -> _FakeTensor | None:
        array = request.tensors.get(name)
        return None if array is None else _FakeTensor(name, array)

    def get_input_config_by_name(config: dict[str, Any], name: str) -> dict[str, Any] | None:
        return next((i for i in config["input"] if i["name"] == name), None)

    module.__dict__.update(
        get_input_tensor_by_name=get_input_tensor_by_name,
        get_input_config_by_name=get_input_config_by_name,
        Tensor=_FakeTensor,
        InferenceResponse=_FakeResponse,
        TritonError=_FakeError,
    )
    return module


def test_model_py_scores_a_batch_in_one_run_and_isolates_bad_requests(
    tiny_heavy_onnx: TinyHeavyOnnx, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from devstack.servers.triton import MODEL_PY

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    spec = importlib.util.spec_from_file_location("heavy_model_under_test", MODEL_PY)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.onnx").symlink_to(tiny_heavy_onnx())
    config = {
        "max_batch_size": 16,
        "input": [{"name": "sequence", "dims": ["65", str(TOKEN_DIM)]}],
        "parameters": {"intra_op_threads": {"string_value": "1"}},
    }
    model = module.TritonPythonModel()
    model.initialize(
        {
            "model_config": json.dumps(config),
            "model_repository": str(tmp_path),
            "model_version": "1",
        }
    )
    runs = 0
    real_run = model.session.run

    def counting_run(*args: Any, **kwargs: Any) -> Any:
        nonlocal runs
        runs += 1
        return real_run(*args, **kwargs)

    model.session.run = counting_run
    good = [sequences(n, TOKEN_DIM, seed=n) for n in (1, 3, 2)]
    requests = [
        _FakeRequest({"sequence": good[0]}),
        _FakeRequest({"sequence": sequences(1, TOKEN_DIM + 1)}),
        _FakeRequest({"sequence": good[1]}),
        _FakeRequest({}),
        _FakeRequest({"sequence": good[2]}),
    ]
    responses = model.execute(requests)

    assert runs == 1
    assert len(responses) == len(requests)
    assert "shape" in responses[1].error.message
    assert "missing" in responses[3].error.message
    for response, data in zip([responses[i] for i in (0, 2, 4)], good, strict=True):
        assert response.error is None
        (score,) = response.output_tensors
        assert score.name == "score"
        np.testing.assert_allclose(score.array, onnx_scores(tiny_heavy_onnx(), data), rtol=1e-6)
