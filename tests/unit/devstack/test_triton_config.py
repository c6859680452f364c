"""The local Triton config: a lone request goes at once; a window only where asked for."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from devstack.servers.triton import CONFIG_TEMPLATE, HeavyModelShape, render_model_config


def rendered(**overrides: int) -> model_config_pb2.ModelConfig:
    text = render_model_config(
        CONFIG_TEMPLATE.read_text(),
        model_name="fraud_heavy",
        shape=HeavyModelShape(seq_len=65, token_dim=33),
        **overrides,
    )
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_the_dynamic_batcher_has_no_window_by_default() -> None:
    config = rendered()
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == 0
    assert config.max_batch_size == 64  # still batches what queues while the instance is busy


@pytest.mark.parametrize("window_us", [50, 200])
def test_a_window_is_rendered_when_asked_for(window_us: int) -> None:
    assert rendered(max_queue_delay_us=window_us).dynamic_batching.max_queue_delay_microseconds == (
        window_us
    )
