"""The committed ONNX models: tensor contracts, score ranges, ranking fraud above genuine.

Scores a fresh simulated stream (a seed the models were not trained on) through the same feature
code the orchestrator uses. Needs only onnxruntime and numpy (no torch, no scikit-learn).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from cascade.features import N_SCREENING_FEATURES, SEQUENCE_LEN, TOKEN_DIM
from cascade.model_registry import Registry, load_registry
from cascade.settings import DEFAULT_MODEL_DIR
from training.datasets import ScreeningData, replay_screening, replay_sequences, roc_auc
from training.simulator import LabelledTransaction, SimulationConfig, simulate

pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL_DIR / "registry.json").exists(), reason="no committed models"
)


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="module")
def stream() -> list[LabelledTransaction]:
    return simulate(SimulationConfig(seed=2024, n_cards=1500, n_days=35))


@pytest.fixture(scope="module")
def screening(stream: list[LabelledTransaction]) -> ScreeningData:
    return replay_screening(stream)


def session(path: object) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_stage1_contract(registry: Registry, screening: ScreeningData) -> None:
    sess = session(registry.stage1_path)
    (inp,) = sess.get_inputs()
    (out,) = sess.get_outputs()
    assert inp.name == "features"
    assert inp.shape[1] == N_SCREENING_FEATURES
    assert out.name == "score"
    for batch in (1, 32):
        (score,) = sess.run(["score"], {"features": screening.features[:batch]})
        assert score.shape == (batch, 1)
        assert score.dtype == np.float32


def test_stage1_ranks_fraud_above_genuine(registry: Registry, screening: ScreeningData) -> None:
    (score,) = session(registry.stage1_path).run(["score"], {"features": screening.features})
    assert ((score >= 0.0) & (score <= 1.0)).all()
    labels = screening.labels
    # Measured 0.9979 on this seeded stream (deterministic): a model that ranks noticeably worse
    # fails here, not only one that ranks like a coin.
    assert roc_auc(score[:, 0], labels) > 0.995
    # calibrated on the real mix: the mean score is near the fraud rate, not near 0.5
    assert score.mean() < 10 * max(labels.mean(), 1e-3)


def test_stage2_contract_and_ranking(
    registry: Registry, stream: list[LabelledTransaction], screening: ScreeningData
) -> None:
    rng = np.random.default_rng(0)
    fraud = np.flatnonzero(screening.labels == 1)
    genuine = rng.choice(np.flatnonzero(screening.labels == 0), size=1500, replace=False)
    rows = np.r_[fraud, genuine].astype(np.int64)
    sequences = replay_sequences(stream, rows)
    assert sequences.shape == (len(rows), SEQUENCE_LEN, TOKEN_DIM)

    sess = session(registry.stage2_path)
    (inp,) = sess.get_inputs()
    assert inp.name == "sequence"
    assert list(inp.shape[1:]) == [SEQUENCE_LEN, TOKEN_DIM]
    assert [o.name for o in sess.get_outputs()] == ["score"]
    for batch in (1, 32):
        (score,) = sess.run(["score"], {"sequence": sequences[:batch]})
        assert score.shape == (batch, 1)
    scores = np.concatenate(
        [
            sess.run(["score"], {"sequence": sequences[i : i + 512]})[0][:, 0]
            for i in range(0, len(rows), 512)
        ]
    )
    assert ((scores >= 0.0) & (scores <= 1.0)).all()
    assert roc_auc(scores, screening.labels[rows]) > 0.99  # measured 0.9955 on this stream
