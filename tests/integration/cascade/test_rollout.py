"""Canary, promote and rollback on real Redis, NATS and Triton (two Triton versions).

The candidate is derived from the committed models: stage 1 is the champion's ONNX file under
another version name (the champion's with ``c`` appended: its own subject and cache keys), stage
2 the committed FP16 variant of the champion's stage 2 (the servable one), served as a Triton
version of its own. The orchestrator and a screening pool run in this process;
both follow ``registry.json`` as they do in the stack.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import REGISTRY

from cascade.canary import in_canary
from cascade.model_registry import (
    load_registry,
    promoted,
    rolled_back,
    sha256_file,
    write_registry,
)
from cascade.settings import DEFAULT_MODEL_DIR, RolloutSettings, Settings
from cascade.v1 import scoring_pb2, scoring_pb2_grpc
from devstack.servers import NatsServer, RedisServer, TritonServer
from orchestrator.server import Orchestrator
from stages.screening.pool import ScreeningPool
from tests.conftest import TEST_PSEUDONYMS, make_wire_transaction
from tests.integration.cascade.conftest import settings_for

pytestmark = pytest.mark.integration

R = scoring_pb2
SHARE = 0.2
_COMMITTED = load_registry(DEFAULT_MODEL_DIR)
CHAMPION = (_COMMITTED.stage1.version, _COMMITTED.stage2.version)
CANDIDATE = (f"{CHAMPION[0]}c", f"{CHAMPION[1]}-fp16")
CHAMPION_TRITON = _COMMITTED.stage2.triton_version or 1
CANDIDATE_TRITON = max(a.triton_version or 1 for a in _COMMITTED.stage2_artifacts()) + 1


@pytest.fixture(scope="module")
def rollout_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``model_dir`` plus a candidate: stage 1 under the name ``CANDIDATE[0]`` (the champion's
    file, renamed) and stage 2 the FP16 variant ``CANDIDATE[1]`` as Triton version
    ``CANDIDATE_TRITON``."""
    root = tmp_path_factory.mktemp("rollout-models")
    shutil.copytree(model_dir, root, dirs_exist_ok=True)
    s1c = f"screening/{CANDIDATE[0]}/model.onnx"
    (root / s1c).parent.mkdir()
    shutil.copy2(root / _COMMITTED.stage1.path, root / s1c)
    registry = json.loads((root / "registry.json").read_text())
    registry.pop("previous", None)  # a Triton of two versions: the champion's and the candidate's
    variants = json.loads((root / "heavy/variants.json").read_text())
    variant = next(v for v in variants["variants"] if v["version"] == CANDIDATE[1])
    assert variant["servable"], variant
    registry["candidate"] = {
        "stage1": {"version": CANDIDATE[0], "path": s1c, "sha256": sha256_file(root / s1c)},
        "stage2": {
            "version": CANDIDATE[1],
            "triton_model": registry["stage2"]["triton_model"],
            "triton_version": CANDIDATE_TRITON,
            "path": variant["path"],
            "sha256": variant["sha256"],
        },
    }
    (root / "registry.json").write_text(json.dumps(registry))
    load_registry(root)  # valid
    return root


@pytest_asyncio.fixture(scope="module")
async def two_version_triton(
    rollout_dir: Path, server_log_dir: Path
) -> AsyncIterator[TritonServer]:
    """Triton serving the champion's stage 2 and the candidate's, each as its own version."""
    registry = load_registry(rollout_dir)
    assert registry.candidate is not None and registry.candidate.stage2 is not None
    async with TritonServer(
        registry.stage2_path,
        model_name=registry.stage2.triton_model or "",
        model_version=CHAMPION_TRITON,
        extra_versions={CANDIDATE_TRITON: rollout_dir / registry.candidate.stage2.path},
        log_dir=server_log_dir / "triton-rollout",
    ) as server:
        yield server


@dataclass
class Canary:
    app: Orchestrator
    pool: ScreeningPool
    stub: scoring_pb2_grpc.ScoringServiceStub
    model_dir: Path


@asynccontextmanager
async def canary_running(settings: Settings) -> AsyncIterator[Canary]:
    provider = TracerProvider()
    async with AsyncExitStack() as stack:
        stack.callback(provider.shutdown)
        pool = await stack.enter_async_context(
            ScreeningPool(settings, provider.get_tracer("test.pool"))
        )
        app = await stack.enter_async_context(Orchestrator(settings, tracer_provider=provider))
        await app.wait_serving(timeout_s=30)
        channel = await stack.enter_async_context(
            grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        )
        await asyncio.wait_for(channel.channel_ready(), timeout=5)
        yield Canary(app, pool, scoring_pb2_grpc.ScoringServiceStub(channel), settings.model_dir)


def rollout_settings(
    model_dir: Path, redis: RedisServer, nats: NatsServer, triton: TritonServer
) -> Settings:
    base = settings_for(model_dir, redis.url, nats.url, triton.grpc_url)
    return base.model_copy(
        update={
            "rollout": RolloutSettings(
                canary_share=SHARE, reload_interval_s=0.1, retire_grace_s=1.0
            )
        }
    )


def tx(card: str, n: int = 0) -> scoring_pb2.Transaction:
    return make_wire_transaction(
        transaction_id=f"tx-{uuid.uuid4().hex[:12]}", card_id=card, amount_minor=1000 + n
    )


@pytest_asyncio.fixture
async def canary(
    rollout_dir: Path,
    tmp_path: Path,
    redis_server: RedisServer,
    nats_server: NatsServer,
    two_version_triton: TritonServer,
) -> AsyncIterator[Canary]:
    """A cascade serving champion and candidate from a registry of its own (tests change it)."""
    own = tmp_path / "models"
    shutil.copytree(rollout_dir, own, symlinks=True)
    settings = rollout_settings(own, redis_server, nats_server, two_version_triton)
    async with canary_running(settings) as c:
        yield c


def served(reply: scoring_pb2.ScoreResponse) -> tuple[str, str]:
    return (reply.versions.stage1, reply.versions.stage2)


def lane_answers(role: str) -> float:
    """This process's ``cascade_lane_answers`` total for ``role``, all label values summed."""
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "cascade_lane_answers"
        for sample in metric.samples
        if sample.name == "cascade_lane_answers_total" and sample.labels["role"] == role
    )


async def test_canary_share_is_near_its_setting_and_sticky_per_card(canary: Canary) -> None:
    counted_before = {role: lane_answers(role) for role in ("champion", "candidate")}
    run = uuid.uuid4().hex[:8]
    cards = [f"card-{run}-{i:05d}" for i in range(2000)]
    replies: list[scoring_pb2.ScoreResponse] = []
    # ScoreBatch splits a batch by lane. 100 a call: each well inside the 1 s batch budget
    # on a machine busy beyond its cores (500 a call took longer there, the rest DEFAULT).
    for start in range(0, len(cards), 100):
        batch = R.ScoreBatchRequest(transactions=[tx(c) for c in cards[start : start + 100]])
        replies += (await canary.stub.ScoreBatch(batch, timeout=30.0)).results
    by_card = {c: served(r) for c, r in zip(cards, replies, strict=True)}
    assert {r.decided_by for r in replies} <= {R.DECIDED_BY_STAGE1, R.DECIDED_BY_STAGE2}
    assert set(by_card.values()) == {CHAMPION, CANDIDATE}
    share = sum(v == CANDIDATE for v in by_card.values()) / len(cards)
    assert abs(share - SHARE) < 0.03, share
    for card, versions in by_card.items():  # the split is the hash's, in every process
        assert versions == (
            CANDIDATE if in_canary(TEST_PSEUDONYMS.card(card), SHARE) else CHAMPION
        ), card

    # Sticky: the same cards again, one call each, new transactions: the same version each time.
    sample = cards[:300]
    again = await asyncio.gather(
        *(canary.stub.Score(R.ScoreRequest(transaction=tx(c, 1)), timeout=5.0) for c in sample)
    )
    assert [served(r) for r in again] == [by_card[c] for c in sample]
    assert all(r.versions.policy and r.versions.feature_set == "fs-1" for r in again)

    # Each lane's metrics counted its own answers, batch and single calls alike.
    answered = [served(r) for r in [*replies, *again]]
    for role, versions in (("champion", CHAMPION), ("candidate", CANDIDATE)):
        counted = lane_answers(role) - counted_before[role]
        assert counted == answered.count(versions), role


async def until(condition: Callable[[], bool], timeout_s: float) -> None:
    """Poll ``condition`` every 50 ms (the services poll the registry file; nothing to await)."""
    async with asyncio.timeout(timeout_s):
        for _ in itertools.count():
            if condition():
                return
            await asyncio.sleep(0.05)


async def wait_for_champion(canary: Canary, versions: tuple[str, str]) -> None:
    def switched() -> bool:
        v = canary.app.generation.champion.versions
        return (v.stage1, v.stage2) == versions

    await until(switched, 30)


def share_is(canary: Canary, share: float) -> bool:
    return canary.app.generation.canary_share == share


def pool_serves(canary: Canary, versions: list[str]) -> bool:
    return canary.pool.versions == versions


async def test_the_share_in_the_registry_is_followed_live(canary: Canary) -> None:
    """``cascade rollout share``: the candidate's share in registry.json overrides the process
    setting and is followed without a restart, by the orchestrator and the worker pool."""
    registry = load_registry(canary.model_dir)
    assert registry.candidate is not None
    run = uuid.uuid4().hex[:8]
    cards = [f"card-{run}-{i:04d}" for i in range(1000)]
    for share in (0.5, 0.0):
        candidate = registry.candidate.model_copy(update={"canary_share": share})
        write_registry(canary.model_dir, registry.model_copy(update={"candidate": candidate}))
        await until(functools.partial(share_is, canary, share), 30)
        assert (canary.app.generation.candidate is None) == (share == 0.0)
        expected_pool = sorted({CHAMPION[0], CANDIDATE[0]}) if share else [CHAMPION[0]]
        await until(functools.partial(pool_serves, canary, expected_pool), 30)
        replies: list[scoring_pb2.ScoreResponse] = []
        for start in range(0, len(cards), 500):
            batch = R.ScoreBatchRequest(transactions=[tx(c) for c in cards[start : start + 500]])
            replies += (await canary.stub.ScoreBatch(batch, timeout=30.0)).results
        for card, reply in zip(cards, replies, strict=True):
            assert served(reply) == (
                CANDIDATE if in_canary(TEST_PSEUDONYMS.card(card), share) else CHAMPION
            ), card
        candidate_share = sum(served(r) == CANDIDATE for r in replies) / len(cards)
        assert abs(candidate_share - share) < 0.05, (share, candidate_share)


async def test_promote_and_rollback_never_answer_from_another_versions_cache(
    canary: Canary,
) -> None:
    run = uuid.uuid4().hex[:8]
    cards = [f"card-{run}-{i:03d}" for i in range(60)]
    txs = [tx(c) for c in cards]
    assert any(in_canary(TEST_PSEUDONYMS.card(c), SHARE) for c in cards) and not all(
        in_canary(TEST_PSEUDONYMS.card(c), SHARE) for c in cards
    )
    # fingerprint of the transaction -> versions of the answer that computed (and cached) it
    computed: dict[str, set[tuple[str, str]]] = {}

    async def score_all(expected: dict[str, tuple[str, str]]) -> list[scoring_pb2.ScoreResponse]:
        replies = []
        for _ in range(2):  # the second round finds the first round's cache entries
            # one at a time: 60 at once can be shed (OVERLOADED) by admission on a busy machine
            round_ = [
                await canary.stub.Score(R.ScoreRequest(transaction=t), timeout=5.0) for t in txs
            ]
            assert canary.app.writer is not None
            await canary.app.writer.flush()
            for t, reply in zip(txs, round_, strict=True):
                assert not reply.degraded, reply
                assert served(reply) == expected[t.card_id]
                if reply.decided_by == R.DECIDED_BY_CACHE:
                    # a cached answer is only ever one computed by the versions it names
                    assert served(reply) in computed.get(t.transaction_id, set()), reply
                else:
                    computed.setdefault(t.transaction_id, set()).add(served(reply))
            replies += round_
        return replies

    def lanes(candidate: tuple[str, str], champion: tuple[str, str]) -> dict[str, tuple[str, str]]:
        return {
            c: candidate if in_canary(TEST_PSEUDONYMS.card(c), SHARE) else champion for c in cards
        }

    canary_replies = await score_all(lanes(CANDIDATE, CHAMPION))
    assert sum(r.decided_by == R.DECIDED_BY_CACHE for r in canary_replies) == len(txs)

    registry = load_registry(canary.model_dir)
    write_registry(canary.model_dir, promoted(registry))
    await wait_for_champion(canary, CANDIDATE)
    assert canary.app.generation.candidate is None
    promoted_replies = await score_all(dict.fromkeys(cards, CANDIDATE))
    first = promoted_replies[: len(txs)]
    # Cards that were the champion's are computed afresh by the promoted versions...
    for t, reply in zip(txs, first, strict=True):
        expected = (
            R.DECIDED_BY_CACHE
            if in_canary(TEST_PSEUDONYMS.card(t.card_id), SHARE)
            else R.DECIDED_BY_STAGE2
        )
        assert reply.decided_by == expected, (t.card_id, reply)

    write_registry(canary.model_dir, rolled_back(load_registry(canary.model_dir)))
    await wait_for_champion(canary, CHAMPION)
    rolled = await score_all(dict.fromkeys(cards, CHAMPION))
    # ...and after the rollback the canary's cards are computed afresh by the old champion.
    for t, reply in zip(txs, rolled[: len(txs)], strict=True):
        expected = (
            R.DECIDED_BY_STAGE2
            if in_canary(TEST_PSEUDONYMS.card(t.card_id), SHARE)
            else R.DECIDED_BY_CACHE
        )
        assert reply.decided_by == expected, (t.card_id, reply)
    # The worker pool followed: the candidate's stage 1 retired once no lane asked for it.
    await until(lambda: canary.pool.versions == [CHAMPION[0]], 10)


async def test_a_broken_registry_change_keeps_the_current_versions_serving(
    canary: Canary,
) -> None:
    (canary.model_dir / "registry.json").write_text('{"feature_set": "fs-1"}')
    await asyncio.sleep(0.5)
    reply = await canary.stub.Score(
        R.ScoreRequest(transaction=tx(f"card-{uuid.uuid4().hex[:8]}")), timeout=5.0
    )
    assert not reply.degraded
    assert canary.app.generation.candidate is not None


def _comparable(reply: scoring_pb2.ScoreResponse) -> bytes:
    """The answer without what differs between any two runs: trace id and timings."""
    copy = scoring_pb2.ScoreResponse()
    copy.CopyFrom(reply)
    copy.ClearField("trace_id")
    copy.ClearField("timings")
    return copy.SerializeToString(deterministic=True)


async def test_shadow_records_the_candidate_without_touching_answers(
    rollout_dir: Path,
    tmp_path: Path,
    redis_server: RedisServer,
    nats_server: NatsServer,
    two_version_triton: TritonServer,
) -> None:
    import redis.asyncio as aioredis

    from devstack.shadow import run_shadow

    run = uuid.uuid4().hex[:8]
    txs = [
        make_wire_transaction(
            transaction_id=f"tx-{run}-{i}", card_id=f"card-{run}-{i % 20}", amount_minor=500 + i
        )
        for i in range(60)
    ]
    shadow_file = tmp_path / "shadow.jsonl"
    answers: dict[bool, list[bytes]] = {}
    for shadow_on, db in ((False, 3), (True, 4)):
        redis_url = f"{redis_server.url.rsplit('/', 1)[0]}/{db}"
        client = aioredis.from_url(redis_url)
        await client.flushdb()
        await client.aclose()
        base = rollout_settings(rollout_dir, redis_server, nats_server, two_version_triton)
        stream = f"DEC{run}{int(shadow_on)}"
        settings = base.model_copy(
            update={
                "rollout": RolloutSettings(canary_share=0.0),  # shadow only: no canary
                "redis": base.redis.model_copy(update={"url": redis_url}),
                "decision_log": base.decision_log.model_copy(
                    update={"stream": stream, "subject_prefix": f"d{run}{int(shadow_on)}"}
                ),
            }
        )
        async with canary_running(settings) as c, AsyncExitStack() as stack:
            assert c.app.generation.candidate is None  # the live path is the champion's alone
            if shadow_on:
                out = stack.enter_context(shadow_file.open("w"))
                shadow = asyncio.create_task(
                    run_shadow(
                        nats_server.url,
                        rollout_dir,
                        out,
                        redis_url=redis_url,
                        stream=stream,
                        subject_prefix=f"d{run}1",
                        follow=True,
                        limit=len(txs),
                    )
                )
            replies = []
            for t in txs:  # one by one: each sees the card's earlier ones, as in the other run
                replies.append(await c.stub.Score(R.ScoreRequest(transaction=t), timeout=5.0))
                assert c.app.writer is not None
                await c.app.writer.flush()
            answers[shadow_on] = [_comparable(r) for r in replies]
            if shadow_on:
                stats = await asyncio.wait_for(shadow, timeout=30)
                assert stats.scored == len(txs)
    assert answers[True] == answers[False]
    rows = [json.loads(line) for line in shadow_file.read_text().splitlines()]
    assert [r["transaction_id"] for r in rows] == [t.transaction_id for t in txs]
    assert {r["candidate_versions"] for r in rows} == {
        "policy-escalate-all/{}/{}/fs-1".format(*CANDIDATE)
    }
    assert {r["champion_versions"] for r in rows} == {
        "policy-escalate-all/{}/{}/fs-1".format(*CHAMPION)
    }
    # the candidate's stage 1 is the champion's file: the same stage-1 scores; its stage 2 is
    # the FP16 variant, scored here on the same sequences: close to the champion's, not equal
    for r in rows:
        assert abs(r["candidate_stage1_score"] - r["champion_stage1_score"]) < 1e-6
        assert r["candidate_escalated"] and r["candidate_stage2_score"] is not None
        assert abs(r["candidate_score"] - r["champion_score"]) < 0.02  # the guardrail bound
    assert any(r["candidate_score"] != r["champion_score"] for r in rows)


async def test_a_shutdown_while_a_replaced_generation_lingers_closes_its_clients(
    rollout_dir: Path,
    tmp_path: Path,
    redis_server: RedisServer,
    nats_server: NatsServer,
    two_version_triton: TritonServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A shutdown cancels the registry follower again and again until it ends (here on every
    loop pass, so that a cancellation lands inside a close). The generation it replaced a moment
    ago, still lingering for its calls, is closed all the way anyway: a NATS client whose close
    was interrupted kept its socket and its subscriptions' tasks (a later test's ResourceWarning
    in a clean-clone CI run)."""
    monkeypatch.setattr("cascade.lifecycle.RECANCEL_S", 0.0)
    own = tmp_path / "models"
    shutil.copytree(rollout_dir, own, symlinks=True)
    settings = rollout_settings(own, redis_server, nats_server, two_version_triton)
    async with canary_running(settings) as canary:
        replaced = canary.app.generation
        assert replaced.candidate is not None
        registry = load_registry(own)
        assert registry.candidate is not None
        candidate = registry.candidate.model_copy(update={"canary_share": 0.0})
        write_registry(own, registry.model_copy(update={"candidate": candidate}))
        await until(functools.partial(share_is, canary, 0.0), 30)
        serving = canary.app.generation
        assert not any(lane.screener.closed for lane in replaced.lanes)
    # left within the replaced generation's linger (the budget plus 1 s)
    assert [lane.screener.closed for lane in (*replaced.lanes, *serving.lanes)] == [True] * 3
