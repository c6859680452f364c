"""Load protection end to end: admission under overload, Redis with one connection, a large chunked
ScoreBatch next to live Score calls, and coalescing of concurrent calls. The worker and the
orchestrator run as their own processes (as ``cascade up`` starts them) against real Redis,
NATS and Triton, so a measured time is the caller's time; each test offers a few seconds of load.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Final

import grpc
import pytest

from cascade.v1 import scoring_pb2, scoring_pb2_grpc
from devstack.servers import NatsServer, RedisServer, TritonServer, free_port
from tests.conftest import BASE_TS_MS, make_wire_transaction
from tests.host import slowdown
from tests.integration.cascade.conftest import cascade_processes, new_request

pytestmark = pytest.mark.integration

R = scoring_pb2
Stub = scoring_pb2_grpc.ScoringServiceStub
DEADLINE_S: Final = 0.050
DEGRADED_BY_REDIS: Final = {R.REASON_CACHE_UNAVAILABLE, R.REASON_FEATURES_UNAVAILABLE}
# For reference answers, where what is answered matters and not when.
ROOMY_BUDGETS: Final = {
    "CASCADE_BUDGET__SLO_MS": "2000",
    "CASCADE_BUDGET__REDIS_MS": "500",
    "CASCADE_BUDGET__STAGE1_MS": "500",
    "CASCADE_ADMISSION__ENABLED": "false",
}
MCCS: Final = ("5411", "5812", "5999", "4121", "5732")
COUNTRIES: Final = ("DE", "FR", "NL", "US", "GB")


@asynccontextmanager
async def stubs(port: int, n: int) -> AsyncIterator[list[Stub]]:
    """``n`` warm stubs, each on its own HTTP/2 connection (as ``n`` callers would hold)."""
    async with AsyncExitStack() as stack:
        out = []
        for _ in range(n):
            channel = await stack.enter_async_context(
                grpc.aio.insecure_channel(
                    f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
                )
            )
            await asyncio.wait_for(channel.channel_ready(), timeout=5)
            out.append(Stub(channel))
        yield out


async def timed(
    stub: Stub, request: scoring_pb2.ScoreRequest, timeout_s: float
) -> tuple[scoring_pb2.ScoreResponse | grpc.StatusCode, float]:
    """The reply (or the status code it failed with) and the caller-measured elapsed seconds."""
    start = time.monotonic()
    try:
        reply: scoring_pb2.ScoreResponse | grpc.StatusCode = await stub.Score(
            request, timeout=timeout_s
        )
    except grpc.aio.AioRpcError as exc:
        reply = exc.code()
    return reply, time.monotonic() - start


async def burst(
    stubs: list[Stub], requests: list[scoring_pb2.ScoreRequest], timeout_s: float
) -> list[tuple[scoring_pb2.ScoreResponse | grpc.StatusCode, float]]:
    """Every request at once, spread over the stubs."""
    return await asyncio.gather(
        *(timed(stubs[i % len(stubs)], r, timeout_s) for i, r in enumerate(requests))
    )


def card_transaction(prefix: str, card: int, k: int) -> scoring_pb2.Transaction:
    """Transaction ``k`` of card ``card``: ids under ``prefix``; everything the models read
    depends only on ``(card, k)``, so two prefixes give the same scores."""
    return make_wire_transaction(
        transaction_id=f"{prefix}-tx-{card}-{k}",
        card_id=f"{prefix}-card-{card}",
        merchant_id=f"m-{(card * 7 + k * 3) % 23}",
        merchant_category=MCCS[(card + k) % len(MCCS)],
        amount_minor=500 + (card * 7919 + k * 104_729) % 250_000,
        country=COUNTRIES[(card // 3 + k) % len(COUNTRIES)],
        timestamp_ms=BASE_TS_MS + card * 1_000 + k * 3_600_000,
    )


def interleaved(prefix: str, cards: int, per_card: int) -> list[scoring_pb2.Transaction]:
    """Each card's transactions in time order, cards interleaved (round ``k`` of every card,
    then round ``k + 1``): a card's transactions land in different chunks of a batch."""
    return [card_transaction(prefix, c, k) for k in range(per_card) for c in range(cards)]


def outcome(reply: scoring_pb2.ScoreResponse) -> tuple[object, ...]:
    return (reply.decision, reply.decided_by, reply.escalated, list(reply.reasons))


def metric_samples(port: int, name: str) -> dict[str, float]:
    """``{labels: value}`` of one metric family's samples from a /metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
    return {m.group(1) or "": float(m.group(2)) for m in pattern.finditer(text)}


def rounds_with_company(port: int, stage: str) -> float:
    """Downstream requests of ``stage`` so far that carried more than one transaction."""
    buckets = metric_samples(port, "cascade_coalesced_items_bucket")
    count = metric_samples(port, "cascade_coalesced_items_count")
    return count[f'{{stage="{stage}"}}'] - buckets[f'{{le="1.0",stage="{stage}"}}']


def shared_stage_rounds(port: int) -> float:
    """Stage-1 and stage-2 requests so far that carried more than one call's transactions.

    Coalescing is opportunistic (calls that reach a stage in the same loop pass, and grpc.aio
    hands the handler one new call per pass), so which stage merges first varies by run."""
    return rounds_with_company(port, "stage1") + rounds_with_company(port, "stage2")


async def test_overload_is_shed_in_time_with_labelled_defaults(
    model_dir: Path,
    redis_server: RedisServer,
    nats_server: NatsServer,
    heavy_triton: TritonServer,
    tmp_path: Path,
) -> None:
    # The product's own open-loop generator, in its own process on uvloop (a client inside
    # this test process falls behind its own schedule first). 900 calls/s for 3 s is about
    # three times what one orchestrator process serves on the machine it was sized on, with
    # every call escalated and the worker, Triton and the generator on the same two cores.
    # On a slower host than they were sized on (tests/host.py) both rates come down with it.
    slower = slowdown()
    rate, overload = round(100 / slower), round(900 / slower)
    port = free_port()
    out = tmp_path / "report"
    async with cascade_processes(
        model_dir,
        tmp_path,
        redis_url=redis_server.url,
        nats_url=nats_server.url,
        triton_url=heavy_triton.grpc_url,
        port=port,
    ):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "devstack.cli",
            "loadtest",
            *("--target", f"127.0.0.1:{port}", "--no-baseline", "--history", "as-simulated"),
            *("--serial-count", "0", "--warmup", "1", "--rate", str(rate), "--duration", "1"),
            *("--overload-rate", str(overload), "--overload-duration", "3", "--out", str(out)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, output.decode()[-2000:]
    report = json.loads((out / "report.json").read_text())
    summary = report["targets"]["cascade"]["overload"]["summary"]

    assert summary["adds_up"]
    assert summary["sent"] >= 0.9 * 3 * overload, f"the generator did not offer {overload}/s"
    assert summary["other_failures"] == 0, summary
    # DEADLINE_EXCEEDED, measured in this test: 0-34 of 2,638 in five runs with admission (one
    # more run counted 339 late and DEADLINE_EXCEEDED together), 295 without it
    # (CASCADE_ADMISSION__ENABLED=false). Not zero: grpc.aio accepts one call per event-loop
    # pass, and with six busy processes on two cores the orchestrator is sometimes descheduled
    # long enough for calls queued in gRPC's core to expire before it sees them. The
    # generator's own "late" count is not asserted here: on two saturated cores its stalls
    # (service times past 100 ms on 50 ms deadlines) are its own. `cascade loadtest` on a
    # quieter stack reports both counts.
    assert summary["deadline_exceeded"] <= summary["sent"] * 3 // 100, summary
    assert summary["shed"] > 0 and summary["served"] > 0, summary
    assert summary["unlabelled_fallbacks"] == 0, summary


async def test_one_redis_connection_carries_concurrent_calls_without_degrading_them(
    model_dir: Path,
    redis_server: RedisServer,
    nats_server: NatsServer,
    heavy_triton: TritonServer,
    tmp_path: Path,
) -> None:
    # 50 calls at once where it was sized, fewer on a slower host (tests/host.py): a burst the
    # host can serve inside the 5 ms Redis cap, with many calls still sharing one connection.
    calls = max(10, round(50 / slowdown()))
    port = free_port()
    env = {"CASCADE_REDIS__CONNECTIONS": "1", "CASCADE_COALESCING__ENABLED": "false"}
    async with (
        cascade_processes(
            model_dir,
            tmp_path,
            redis_url=redis_server.url,
            nats_url=nats_server.url,
            triton_url=heavy_triton.grpc_url,
            extra_env=env,
            port=port,
        ),
        stubs(port, 4) as callers,
    ):
        await burst(callers, [new_request() for _ in range(calls)], 2.0)
        await asyncio.sleep(0.2)
        # The server's budget is the 50 ms SLO whatever the deadline; the longer deadline only
        # keeps this client's own slowness at issuing the calls at once out of the result.
        replies = await burst(callers, [new_request() for _ in range(calls)], 4 * DEADLINE_S)

    failed = [r for r, _ in replies if not isinstance(r, scoring_pb2.ScoreResponse)]
    assert failed == [], f"{len(failed)} of {calls} calls failed: {sorted(set(map(str, failed)))}"
    answers = [r for r, _ in replies if isinstance(r, scoring_pb2.ScoreResponse)]
    without_redis = [list(r.reasons) for r in answers if DEGRADED_BY_REDIS & set(r.reasons)]
    shed = sum(1 for r in answers if R.REASON_OVERLOADED in r.reasons)
    assert without_redis == [], (
        f"{len(without_redis)} of {len(answers) - shed} scored answers went without Redis "
        f"({shed} shed): {without_redis[:5]}"
    )


async def test_large_batch_scores_like_single_calls_without_delaying_live_calls(
    model_dir: Path,
    redis_server: RedisServer,
    nats_server: NatsServer,
    heavy_triton: TritonServer,
    tmp_path: Path,
) -> None:
    run = uuid.uuid4().hex[:8]
    cards, per_card = 100, 10
    batch_txs = interleaved(f"b{run}", cards, per_card)
    single_txs = interleaved(f"s{run}", cards, per_card)
    port = free_port()
    # 1,000 escalations take longer on a slower host (tests/host.py): the batch budget follows.
    batch_slo_s = 5.0 * slowdown()
    on_servers = functools.partial(
        cascade_processes,
        model_dir,
        redis_url=redis_server.url,
        nats_url=nats_server.url,
        triton_url=heavy_triton.grpc_url,
    )
    async with (
        on_servers(
            tmp_path / "batch",
            port=port,
            # Every call escalates under this policy: 1,000 stage-2 inferences on a CPU Triton
            # take longer than the default 1 s batch budget (production escalates ~10%).
            extra_env={"CASCADE_BUDGET__BATCH_SLO_MS": str(round(batch_slo_s * 1000))},
        ) as (stub, _, _),
        stubs(port, 1) as (live_stub,),
    ):
        await burst([live_stub], [new_request() for _ in range(20)], 1.0)
        batch_call = asyncio.ensure_future(
            stub.ScoreBatch(R.ScoreBatchRequest(transactions=batch_txs), timeout=2 * batch_slo_s)
        )
        live: list[tuple[scoring_pb2.ScoreResponse | grpc.StatusCode, float]] = []
        while not batch_call.done() and len(live) < 20:
            live.append(await timed(live_stub, new_request(), DEADLINE_S))
            await asyncio.sleep(0.010)
        batch = list((await batch_call).results)
    # The reference: the same transactions one by one, in the same order (a card's next one is
    # 100 calls later, so the previous one's post-answer history write has landed), on a stack
    # with roomy budgets, so that a host pause over a 5 ms cap in 1,000 serial calls on a
    # shared 2-core machine cannot turn the reference itself into a degraded answer.
    async with on_servers(tmp_path / "single", extra_env=ROOMY_BUDGETS) as (stub, _, _):
        single = [
            await stub.Score(R.ScoreRequest(transaction=tx), timeout=2.0) for tx in single_txs
        ]

    assert [r.transaction_id for r in batch] == [tx.transaction_id for tx in batch_txs]
    assert [r for r in batch if r.degraded] == []
    assert [r for r in single if r.degraded] == []
    assert [outcome(r) for r in batch] == [outcome(r) for r in single]
    assert [r.score for r in batch] == pytest.approx([r.score for r in single], abs=1e-5)
    assert [r.stage1_score for r in batch] == pytest.approx(
        [r.stage1_score for r in single], abs=1e-5
    )
    assert len(live) >= 5, "the batch finished before live calls could overlap it"
    assert all(isinstance(r, scoring_pb2.ScoreResponse) for r, _ in live), live
    assert [round(s * 1000, 1) for _, s in live if s >= DEADLINE_S] == []
    degraded = [
        (list(r.reasons), r.timings.redis_us)
        for r, _ in live
        if isinstance(r, scoring_pb2.ScoreResponse) and r.degraded
    ]
    assert degraded == [], f"{len(degraded)} of {len(live)} live calls degraded (reasons, redis_us)"


async def test_coalesced_calls_score_like_uncoalesced_ones_with_their_own_timings(
    model_dir: Path,
    redis_server: RedisServer,
    nats_server: NatsServer,
    heavy_triton: TritonServer,
    tmp_path: Path,
) -> None:
    run = uuid.uuid4().hex[:8]
    cards = 100
    history = interleaved(run, cards, 3)
    calls = [card_transaction(run, c, 3) for c in range(cards)]
    base_url = redis_server.url.rsplit("/", 1)[0]
    metrics_port = free_port()
    replies: dict[bool, list[tuple[scoring_pb2.ScoreResponse | grpc.StatusCode, float]]] = {}
    before = shared_rounds = 0.0
    for coalescing in (True, False):
        port = free_port()
        env = {
            **ROOMY_BUDGETS,  # this test is about what coalescing answers, not when
            "CASCADE_REDIS__URL": f"{base_url}/{1 if coalescing else 2}",  # own key space each
            "CASCADE_COALESCING__ENABLED": str(coalescing).lower(),
        }
        if coalescing:
            env["CASCADE_METRICS_PORT"] = str(metrics_port)
        async with (
            cascade_processes(
                model_dir,
                tmp_path / f"coalescing-{coalescing}",
                redis_url=env["CASCADE_REDIS__URL"],
                nats_url=nats_server.url,
                triton_url=heavy_triton.grpc_url,
                extra_env=env,
                port=port,
            ) as (stub, _, _),
            stubs(port, 4) as callers,
        ):
            await stub.ScoreBatch(R.ScoreBatchRequest(transactions=history), timeout=10.0)
            # Warm-up bursts: the worker and Triton meet each coalesced batch shape once first.
            for _ in range(2):
                await burst(callers, [new_request() for _ in range(cards)], 5.0)
            await asyncio.sleep(0.2)  # the batch's history writes land
            if coalescing:
                before = shared_stage_rounds(metrics_port)
            requests = [R.ScoreRequest(transaction=tx) for tx in calls]
            replies[coalescing] = await burst(callers, requests, 5.0)
            if coalescing:
                shared_rounds = shared_stage_rounds(metrics_port) - before

    answers = [r for r, _ in replies[True] if isinstance(r, scoring_pb2.ScoreResponse)]
    baseline = [r for r, _ in replies[False] if isinstance(r, scoring_pb2.ScoreResponse)]
    assert len(answers) == len(baseline) == cards, "some calls failed"
    assert shared_rounds > 0, "no stage-1 or stage-2 request carried more than one call's work"
    assert [r.transaction_id for r in answers] == [tx.transaction_id for tx in calls]
    degraded = [(list(r.reasons), r.timings.redis_us) for r in answers if r.degraded]
    assert degraded == [], f"{len(degraded)} of 100 coalesced answers degraded (reasons, redis_us)"
    assert not any(r.degraded for r in baseline)
    assert [outcome(r) for r in answers] == [outcome(r) for r in baseline]
    assert [r.score for r in answers] == pytest.approx([r.score for r in baseline], abs=1e-5)
    assert [r.versions for r in answers] == [r.versions for r in baseline]
    # Each call's timings are its own: not one round's copied into each member.
    totals_us = [r.timings.total_us for r in answers]
    assert len(set(totals_us)) > len(totals_us) // 2
    for reply, elapsed_s in replies[True]:
        assert isinstance(reply, scoring_pb2.ScoreResponse)
        assert 0 < reply.timings.total_us <= elapsed_s * 1e6
