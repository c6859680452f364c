"""Naming clusters in the settings, the store keys' hash tags, and how the cluster client's
errors join the cascade's tree: no sockets."""

from __future__ import annotations

import pytest
import redis.exceptions
from pydantic import ValidationError
from redis.crc import key_slot

from cascade.errors import (
    DependencyFailed,
    DependencyTimeout,
    DependencyUnavailable,
    translate_redis_errors,
)
from cascade.settings import DecisionLogSettings, NatsSettings, RedisSettings, split_urls
from orchestrator.online_store import card_history_key, output_cache_key
from orchestrator.results import ModelVersions
from tests.conftest import make_transaction

VERSIONS = ModelVersions(policy="p-1", stage1="s1-1", stage2="s2-1", feature_set="fs-1")


def test_a_server_list_is_split_on_commas_with_blanks_dropped() -> None:
    assert split_urls("nats://a:1, nats://b:2 ,,nats://c:3") == [
        "nats://a:1",
        "nats://b:2",
        "nats://c:3",
    ]


def test_nats_takes_one_url_or_a_cluster_list() -> None:
    assert NatsSettings(url="nats://127.0.0.1:4222").url == "nats://127.0.0.1:4222"
    NatsSettings(url="nats://127.0.0.1:1,nats://127.0.0.1:2,tls://h:3")
    with pytest.raises(ValidationError, match=r"nats\.url: each URL must start with nats://"):
        NatsSettings(url="nats://127.0.0.1:1,127.0.0.1:2")
    with pytest.raises(ValidationError, match="names no server"):
        NatsSettings(url=" , ")
    with pytest.raises(ValidationError, match=r"decision_log\.url"):
        DecisionLogSettings(url="http://x")


def test_several_redis_urls_need_cluster_mode() -> None:
    urls = "redis://127.0.0.1:7000,redis://127.0.0.1:7001"
    with pytest.raises(ValidationError, match=r"set redis\.cluster=true"):
        RedisSettings(url=urls)
    settings = RedisSettings(url=urls, cluster=True)
    assert settings.urls == ["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"]
    assert RedisSettings().urls == ["redis://127.0.0.1:6379/0"]
    with pytest.raises(ValidationError, match="redis://"):
        RedisSettings(url="127.0.0.1:7000", cluster=True)


@pytest.mark.parametrize("card", ["card-42", "c", "card-7-000087", "a.b:c/d+e=f@g_h"])
def test_a_cards_cache_and_history_keys_share_one_cluster_slot(card: str) -> None:
    tx = make_transaction(card_id=card)
    cache_key = output_cache_key(tx, VERSIONS)
    history_key = card_history_key(card, VERSIONS.feature_set)
    assert f"{{{card}}}" in cache_key and f"{{{card}}}" in history_key
    assert key_slot(cache_key.encode()) == key_slot(history_key.encode())
    # The tag is the card alone: another transaction of the card, another version, one slot.
    other = output_cache_key(make_transaction(card_id=card, amount_minor=1), VERSIONS)
    assert other != cache_key and key_slot(other.encode()) == key_slot(history_key.encode())


def test_cards_spread_over_the_slots() -> None:
    slots = {key_slot(card_history_key(f"card-{i}", "fs-1").encode()) for i in range(200)}
    assert len(slots) > 190


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (
            redis.exceptions.ClusterDownError("CLUSTERDOWN The cluster is down"),
            DependencyUnavailable,
        ),
        (redis.exceptions.MasterDownError("MASTERDOWN"), DependencyUnavailable),
        (redis.exceptions.TryAgainError("TRYAGAIN"), DependencyUnavailable),
        (redis.exceptions.MovedError("3999 127.0.0.1:6381"), DependencyUnavailable),
        (redis.exceptions.SlotNotCoveredError("slot 12 not covered"), DependencyUnavailable),
        (redis.exceptions.RedisClusterException("cannot be connected"), DependencyUnavailable),
        (redis.exceptions.ConnectionError("refused"), DependencyUnavailable),
        (redis.exceptions.TimeoutError("slow"), DependencyTimeout),
        (TimeoutError(), DependencyTimeout),
        (redis.exceptions.ResponseError("WRONGTYPE"), DependencyFailed),
    ],
)
def test_cluster_client_errors_translate_into_the_tree(
    raised: Exception, expected: type[Exception]
) -> None:
    with pytest.raises(expected) as caught, translate_redis_errors():
        raise raised
    assert caught.value.__cause__ is raised
