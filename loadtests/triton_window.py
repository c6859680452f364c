"""What the dynamic batcher's window costs a lone stage-2 request: two local Tritons serving the
registry's heavy model, one with no window and one with ``--window-us``, asked one request at a
time, alternating between them, so drift of a shared machine hits both alike.

Usage: ``python -m loadtests.triton_window [--n 1500] [--window-us 200]``
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import tritonclient.grpc.aio as grpcclient

from cascade.model_registry import load_registry
from cascade.settings import DEFAULT_MODEL_DIR
from devstack.servers.triton import INPUT_NAME, OUTPUT_NAME, TritonServer, read_model_shape
from loadtests.histogram import percentile_of_sorted


async def _call(
    client: grpcclient.InferenceServerClient, model: str, batch: npt.NDArray[np.float32]
) -> None:
    tensor = grpcclient.InferInput(INPUT_NAME, list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    outputs = [grpcclient.InferRequestedOutput(OUTPUT_NAME)]
    await client.infer(model, [tensor], outputs=outputs, client_timeout=10)


async def measure(n: int, window_us: int) -> dict[int, list[float]]:
    """Milliseconds per call, by window, ``n`` calls to each, alternating."""
    registry = load_registry(DEFAULT_MODEL_DIR)
    onnx = registry.stage2_path
    model = registry.stage2.triton_model or "fraud_heavy"
    shape = read_model_shape(onnx)
    rng = np.random.default_rng(0)
    batch = rng.standard_normal((1, shape.seq_len, shape.token_dim), dtype=np.float32)
    times: dict[int, list[float]] = {0: [], window_us: []}
    async with (
        TritonServer(onnx, model_name=model, max_queue_delay_us=0) as plain,
        TritonServer(onnx, model_name=model, max_queue_delay_us=window_us) as windowed,
        grpcclient.InferenceServerClient(plain.grpc_url) as to_plain,
        grpcclient.InferenceServerClient(windowed.grpc_url) as to_windowed,
    ):
        pairs = [(0, to_plain), (window_us, to_windowed)]
        for _, client in pairs:  # warm-up
            for _ in range(50):
                await _call(client, model, batch)
        for i in range(n):
            for key, client in pairs if i % 2 else pairs[::-1]:
                started = time.perf_counter()
                await _call(client, model, batch)
                times[key].append((time.perf_counter() - started) * 1000)
                await asyncio.sleep(0.002)  # a lone request: nothing else queued
    return times


def main(argv: Sequence[str] | None = None) -> int:
    """Print p50 / p90 / p99 per window."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1500, help="calls to each Triton")
    parser.add_argument("--window-us", type=int, default=200, help="the compared window")
    args = parser.parse_args(argv)
    if args.window_us <= 0 or args.n < 1:
        parser.error("--window-us and --n must be positive")
    for window, samples in asyncio.run(measure(args.n, args.window_us)).items():
        samples.sort()
        p50, p90, p99 = (percentile_of_sorted(samples, p) for p in (50, 90, 99))
        print(f"window {window:4d} us: p50 {p50:.3f} ms, p90 {p90:.3f} ms, p99 {p99:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
