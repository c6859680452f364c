"""The production deployment files: the compose file validates, and the Triton configs agree.

The local Triton (Python backend, ``stages/heavy/config.pbtxt.template``) and the production one
(onnxruntime backend, ``deploy/triton/model_repository``) must serve the same model name and
tensors, or the orchestrator would work locally and fail in production. Both files are parsed with
Triton's own ``ModelConfig`` protobuf, so a typo in either fails here, not at deploy time.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Final

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from cascade.features import SEQUENCE_LEN, TOKEN_DIM
from cascade.model_registry import load_registry
from cascade.settings import DEFAULT_MODEL_DIR
from devstack.servers.triton import CONFIG_TEMPLATE, HeavyModelShape, render_model_config

pytestmark = pytest.mark.integration

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
COMPOSE_FILE: Final = REPO_ROOT / "deploy" / "docker-compose.yml"
DEPLOY_CONFIG: Final = (
    REPO_ROOT / "deploy" / "triton" / "model_repository" / "fraud_heavy" / "config.pbtxt"
)
FP32: Final = model_config_pb2.DataType.Value("TYPE_FP32")


def parse_config(text: str) -> model_config_pb2.ModelConfig:
    """Parse a ``config.pbtxt`` with Triton's schema (unknown fields are errors)."""
    config = model_config_pb2.ModelConfig()
    text_format.Parse(text, config)
    return config


def local_config() -> model_config_pb2.ModelConfig:
    """The local template rendered as ``cascade up`` would render it for the feature set."""
    text = render_model_config(
        CONFIG_TEMPLATE.read_text(),
        model_name=load_registry(DEFAULT_MODEL_DIR).stage2.triton_model or "",
        shape=HeavyModelShape(seq_len=SEQUENCE_LEN, token_dim=TOKEN_DIM),
    )
    return parse_config(text)


def deploy_config() -> model_config_pb2.ModelConfig:
    """The production config."""
    return parse_config(DEPLOY_CONFIG.read_text())


def tensors(
    config: model_config_pb2.ModelConfig,
) -> tuple[list[tuple[str, int, list[int]]], list[tuple[str, int, list[int]]]]:
    """(name, data type, dims) of the inputs and of the outputs."""
    return (
        [(t.name, t.data_type, list(t.dims)) for t in config.input],
        [(t.name, t.data_type, list(t.dims)) for t in config.output],
    )


def test_compose_file_validates() -> None:
    docker_compose = shutil.which("docker-compose")
    if docker_compose is None:
        if os.environ.get("CI"):  # CI must validate the file, not quietly skip it
            pytest.fail("docker-compose is not on PATH; scripts/setup --dev installs it as root")
        pytest.skip(
            "docker-compose is not on PATH (apt-get install docker-compose; CI installs it)"
        )
    checked = subprocess.run(
        [docker_compose, "-f", str(COMPOSE_FILE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    rendered = subprocess.run(
        [docker_compose, "-f", str(COMPOSE_FILE), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    champion = load_registry(DEFAULT_MODEL_DIR).stage2  # compose serves the registry's champion
    mount = f"models/{champion.path}:/models/fraud_heavy/{champion.triton_version}/model.onnx:ro"
    assert mount in rendered
    assert "cascade.quality_job" in rendered  # the quality job runs beside the services
    assert ":/models/fraud_heavy/config.pbtxt:ro" in rendered
    assert re.search(r"driver: nvidia", rendered), "the GPU reservation was dropped"
    assert re.search(r"replicas: 2", rendered)


def test_prometheus_scrapes_every_orchestrator_process() -> None:
    """Process i of CASCADE_SERVER__PROCESSES serves metrics on 9464 + i: one target each."""
    processes = re.search(r'CASCADE_SERVER__PROCESSES: "(\d+)"', COMPOSE_FILE.read_text())
    assert processes is not None, "the orchestrator no longer runs several processes"
    count = int(processes[1])
    assert count > 1
    scrape = (REPO_ROOT / "deploy" / "prometheus.yml").read_text()
    job = re.search(r"job_name: orchestrator\n\s+static_configs:\n\s+- targets: \[(.*)\]", scrape)
    assert job is not None, scrape
    targets = [t.strip().strip('"') for t in job[1].split(",")]
    assert targets == [f"orchestrator:{9464 + i}" for i in range(count)]


def test_local_and_deploy_configs_serve_the_same_model_and_tensors() -> None:
    local, deploy = local_config(), deploy_config()
    assert local.name == deploy.name == load_registry(DEFAULT_MODEL_DIR).stage2.triton_model
    assert tensors(local) == tensors(deploy)
    assert tensors(deploy) == (
        [("sequence", FP32, [SEQUENCE_LEN, TOKEN_DIM])],
        [("score", FP32, [1])],
    )
    assert local.max_batch_size == deploy.max_batch_size > 1
    assert local.HasField("dynamic_batching")
    assert deploy.HasField("dynamic_batching")


def test_backends_and_instance_kinds() -> None:
    local, deploy = local_config(), deploy_config()
    assert local.backend == "python"
    assert [g.kind for g in local.instance_group] == [
        model_config_pb2.ModelInstanceGroup.Kind.Value("KIND_CPU")
    ]
    assert deploy.backend == "onnxruntime"
    assert [(g.kind, g.count) for g in deploy.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.Kind.Value("KIND_GPU"), 2)
    ]


def test_the_commented_tensorrt_block_is_a_valid_config() -> None:
    text = DEPLOY_CONFIG.read_text()
    block = re.search(r"^# optimization \{\n(?:#.*\n)+", text, re.MULTILINE)
    assert block is not None, "the TensorRT block is gone from the deploy config"
    uncommented = "\n".join(
        line.removeprefix("#").removeprefix(" ") for line in block[0].splitlines()
    )
    config = parse_config(text + "\n" + uncommented)
    accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert [a.name for a in accelerators] == ["tensorrt"]
    assert accelerators[0].parameters["precision_mode"] == "FP16"
