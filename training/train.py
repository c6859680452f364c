"""The training run: simulate, featurise, fit both stages, export, verify, write artifacts.

This module owns the end-to-end pipeline behind ``python -m training train``:

1. simulate a stream (:mod:`training.simulator`) and replay it through :mod:`cascade.features`;
2. split by time into three windows: the last ``holdout_days`` days are the evaluation window
   the model cards and the report measure, the ``calibration_days`` before them the calibration
   window the policy's thresholds are picked on, everything before trains;
3. stage 1: gradient-boosted trees on every training transaction's screening features;
4. stage 2: the sequence transformer on all training fraud plus subsampled genuine transactions
   (half at random, half "hard" ones from the top of stage 1's scores), importance-weighted
   Platt scaling folded into the graph;
5. export both to ONNX, check them with onnxruntime against the training frameworks at batch 1
   and 32, and time them at batch 1;
6. pick a first policy on the calibration window (escalate the top ``escalation_rate`` of
   stage-1 scores; REVIEW / DECLINE at the cascade's 1% / 0.1% false-positive-rate thresholds),
   so that the figures reported for it on the evaluation window are not the ones it was fit to;
7. write ``models/<stage>/<version>/model.onnx`` + ``model_card.md``, the policy file and
   ``models/registry.json`` (sha256 of each artifact). Existing versions are never overwritten.

Held-out evaluation of stage 2 uses every held-out fraud plus a stratified sample of genuine
transactions; sample weights restore the real mix, so false-positive rates are for real traffic.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import onnxruntime as ort

from cascade.features import (
    FEATURE_SET_VERSION,
    HISTORY_LEN,
    N_SCREENING_FEATURES,
    SCREENING_FEATURE_NAMES,
    SEQUENCE_LEN,
    TOKEN_DIM,
    TOKEN_FEATURE_NAMES,
)
from cascade.model_registry import REGISTRY_FILE, Policy, sha256_file
from training.datasets import ScreeningData, replay_screening, replay_sequences
from training.evaluation import (
    build_eval_set,
    cascade_scores,
    metrics_table,
    pick_policy,
    stage1_scores,
    stage2_scores,
    stratified_negatives,
    time_onnx,
)
from training.simulator import SIMULATOR_VERSION, SimulationConfig, simulate

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from numpy.typing import NDArray

    from training.simulator import LabelledTransaction

__all__ = ["TrainConfig", "TrainResult", "run_training"]

logger = logging.getLogger(__name__)

TRITON_MODEL_NAME: Final = "fraud_heavy"
_HARD_TOP_SHARE: Final = 0.10  # training: "hard" genuine = top 10% of stage-1 scores


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Everything that determines a training run (the simulator config included)."""

    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    holdout_days: int = 25
    calibration_days: int = 15
    stage1_iterations: int = 250
    stage2_random_negatives: int = 12_000
    stage2_hard_negatives: int = 12_000
    eval_negatives_per_stratum: int = 15_000
    escalation_rate: float = 0.08
    stage1_version: str = "s1-1"
    stage2_version: str = "s2-1"
    policy_version: str = "policy-1"
    triton_version: int = 1
    seed: int = 11


@dataclass(slots=True)
class TrainResult:
    """What a run produced, for the CLI and the report."""

    model_dir: Path
    metrics: dict[str, Any]
    policy: Policy
    wall_s: float


def _check_onnx(
    path: Path,
    input_name: str,
    inputs: NDArray[np.float32],
    expected: NDArray[np.float32],
) -> float:
    """Run the ONNX file at batch 1 and 32; check shapes and ranges; return max |diff|."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [input_name]
    assert [o.name for o in session.get_outputs()] == ["score"]
    worst = 0.0
    for batch in (1, 32):
        (score,) = session.run(["score"], {input_name: inputs[:batch]})
        if score.shape != (batch, 1) or score.dtype != np.float32:
            raise RuntimeError(f"{path}: batch {batch} gave {score.shape} {score.dtype}")
        if not ((score >= 0) & (score <= 1)).all():
            raise RuntimeError(f"{path}: scores outside [0, 1]")
        worst = max(worst, float(np.abs(score[:, 0] - expected[:batch]).max()))
    return worst


def _fmt(value: float) -> str:
    return "n/a" if value != value else f"{value:.3f}"  # NaN check


def _metrics_markdown(table: dict[str, dict[str, float]]) -> str:
    lines = [
        "| slice | fraud rows | PR-AUC | ROC-AUC | recall @0.1% FPR | recall @1% FPR |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in table.items():
        lines.append(
            f"| {name} | {int(m['n_fraud'])} | {_fmt(m['pr_auc'])} | {_fmt(m['roc_auc'])} | "
            f"{_fmt(m['recall_at_0.1%_fpr'])} | {_fmt(m['recall_at_1%_fpr'])} |"
        )
    return "\n".join(lines)


def _model_card(
    *,
    title: str,
    version: str,
    path: Path,
    inputs: str,
    architecture: str,
    config: TrainConfig,
    data: dict[str, Any],
    table: dict[str, dict[str, float]],
    timing: dict[str, float],
    eval_note: str,
) -> str:
    sim = asdict(config.simulation)
    return f"""# {title} — `{version}`

| | |
|---|---|
| version | `{version}` |
| file | `model.onnx` ({path.stat().st_size / 1024:.0f} KiB) |
| sha256 | `{sha256_file(path)}` |
| feature set | `{FEATURE_SET_VERSION}` (`cascade/features.py`) |
| data | simulator `{SIMULATOR_VERSION}`, seed {sim["seed"]}, {sim["n_cards"]} cards, \
{sim["n_days"]} days |
| split | by time: last {config.holdout_days} days evaluated (below), the \
{config.calibration_days} before them calibrate the policy's thresholds, the rest trains |
| training seed | {config.seed} |
| produced by | `python -m training train` |

## Tensor contract
{inputs}

## Model
{architecture}

Training data: {data["train_rows"]} rows ({data["train_fraud"]} fraud). Calibration: \
{data["calibration_rows"]} transactions ({data["calibration_fraud"]} fraud). Held-out: \
{data["holdout_rows"]} transactions ({data["holdout_fraud"]} fraud).

## Held-out metrics
{eval_note}

{_metrics_markdown(table)}

## Inference time
onnxruntime {ort.__version__}, CPU, one thread, batch 1, on {platform.machine()} \
({platform.processor() or "cpu"}): p50 {timing["p50_ms"]:.3f} ms, p99 {timing["p99_ms"]:.3f} ms.
"""


def _new_version_dir(path: Path, force: bool) -> None:
    if path.exists() and any(path.iterdir()) and not force:
        raise FileExistsError(f"{path} exists: versions are immutable (pick a new version)")
    path.mkdir(parents=True, exist_ok=True)


def run_training(
    model_dir: Path,
    config: TrainConfig | None = None,
    *,
    records: Sequence[LabelledTransaction] | None = None,
    force: bool = False,
) -> TrainResult:
    """Run the whole pipeline and write the artifacts under ``model_dir``."""
    from training.heavy_model import HeavyConfig, export_heavy, train_heavy
    from training.screening_model import export_screening, train_screening

    config = config or TrainConfig()
    started = time.perf_counter()
    s1_dir = model_dir / "screening" / config.stage1_version
    s2_dir = model_dir / "heavy" / config.stage2_version
    policy_path = model_dir / "policies" / f"{config.policy_version}.json"
    _new_version_dir(s1_dir, force)
    _new_version_dir(s2_dir, force)
    if policy_path.exists() and not force:
        raise FileExistsError(f"{policy_path} exists: versions are immutable")

    if records is None:
        records = simulate(config.simulation)
    t = time.perf_counter()
    data: ScreeningData = replay_screening(records)
    logger.info("screening features for %d rows in %.0f s", len(records), time.perf_counter() - t)
    eval_first = config.simulation.n_days - config.holdout_days
    calib_first = eval_first - config.calibration_days
    if calib_first <= 0:
        raise ValueError("holdout_days + calibration_days leave no training days")
    train_rows = np.flatnonzero(data.day < calib_first)
    calib_rows = np.flatnonzero((data.day >= calib_first) & (data.day < eval_first))
    hold_rows = np.flatnonzero(data.day >= eval_first)
    rng = np.random.default_rng(config.seed)

    # --- stage 1
    t = time.perf_counter()
    trees = train_screening(
        data.features[train_rows],
        data.labels[train_rows],
        seed=config.seed,
        max_iter=config.stage1_iterations,
    )
    s1_path = s1_dir / "model.onnx"
    export_screening(trees, s1_path)
    logger.info("stage 1 trained and exported in %.0f s", time.perf_counter() - t)
    s1_all = stage1_scores(s1_path, data.features)
    s1_diff = _check_onnx(
        s1_path,
        "features",
        data.features[hold_rows[:32]],
        trees.predict_proba(data.features[hold_rows[:32]])[:, 1].astype(np.float32),
    )

    # --- stage 2 training set: every training fraud + stratified genuine rows
    train_pos = train_rows[data.labels[train_rows] == 1]
    train_neg = train_rows[data.labels[train_rows] == 0]
    neg_idx, neg_w = stratified_negatives(
        rng,
        train_neg,
        s1_all,
        _HARD_TOP_SHARE,
        config.stage2_hard_negatives,
        config.stage2_random_negatives,
    )
    s2_idx = np.r_[train_pos, neg_idx].astype(np.int64)
    s2_w = np.r_[np.ones(len(train_pos)), neg_w]
    t = time.perf_counter()
    s2_x = replay_sequences(records, s2_idx)
    logger.info("%d training sequences in %.0f s", len(s2_idx), time.perf_counter() - t)
    heavy_config = HeavyConfig()
    t = time.perf_counter()
    net = train_heavy(s2_x, data.labels[s2_idx], s2_w, heavy_config, seed=config.seed)
    logger.info("stage 2 trained in %.0f s", time.perf_counter() - t)
    del s2_x
    s2_path = s2_dir / "model.onnx"
    export_heavy(net, s2_path)

    # --- calibration window: the policy's thresholds, on days neither trained nor reported
    t = time.perf_counter()
    calibration = build_eval_set(
        records,
        data,
        s1_all,
        calib_rows,
        negatives_per_stratum=config.eval_negatives_per_stratum,
        seed=config.seed + 1,
    )
    if calibration.sequences is None:
        raise RuntimeError("build_eval_set returned no sequences")
    calibration.stage2 = stage2_scores(s2_path, calibration.sequences)
    calibration.sequences = None
    sim = config.simulation
    policy = pick_policy(calibration, config.escalation_rate, config.policy_version).model_copy(
        update={
            "calibrated_on": f"simulator {SIMULATOR_VERSION} seed {sim.seed}, {sim.n_cards} "
            f"cards, days {calib_first}-{eval_first - 1} (trained on days 0-{calib_first - 1}, "
            f"evaluated on days {eval_first}-{sim.n_days - 1})"
        }
    )
    logger.info("policy picked on the calibration window in %.0f s", time.perf_counter() - t)
    del calibration

    # --- held-out: stage 1 on everything, stage 2 on all fraud + a stratified genuine sample
    t = time.perf_counter()
    held_out = build_eval_set(
        records,
        data,
        s1_all,
        hold_rows,
        negatives_per_stratum=config.eval_negatives_per_stratum,
        seed=config.seed,
    )
    sequences = held_out.sequences
    if sequences is None:
        raise RuntimeError("build_eval_set returned no sequences")
    held_out.stage2 = stage2_scores(s2_path, sequences)
    logger.info("stage 2 held-out scoring in %.0f s", time.perf_counter() - t)
    import torch

    with torch.inference_mode():
        torch_ref = net(torch.from_numpy(sequences[:32])).numpy()[:, 0]
    s2_diff = _check_onnx(s2_path, "sequence", sequences[:32], torch_ref)
    s1_timing = time_onnx(s1_path, data.features[hold_rows[:1]])
    s2_timing = time_onnx(s2_path, sequences[:1])
    held_out.sequences = None
    del sequences
    sample_w = held_out.sample_weight
    s1_hold = held_out.stage1_all
    s1_table = metrics_table(s1_hold, held_out.labels_all, held_out.patterns_all)
    s2_table = metrics_table(held_out.stage2, held_out.labels, held_out.patterns, sample_w)
    final = cascade_scores(
        held_out.stage1, held_out.stage2, policy.escalate_low, policy.escalate_high
    )
    cascade_table = metrics_table(final, held_out.labels, held_out.patterns, sample_w)
    n_eval_neg = int((held_out.labels == 0).sum())

    # --- artifacts
    data_info = {
        "train_rows": len(train_rows),
        "train_fraud": int(data.labels[train_rows].sum()),
        "calibration_rows": len(calib_rows),
        "calibration_fraud": int(data.labels[calib_rows].sum()),
        "holdout_rows": len(hold_rows),
        "holdout_fraud": int(data.labels[hold_rows].sum()),
    }
    (s1_dir / "model_card.md").write_text(
        _model_card(
            title="Stage 1 screening model",
            version=config.stage1_version,
            path=s1_path,
            inputs=(
                f"input `features` float32 `[N, {N_SCREENING_FEATURES}]` -> output `score` "
                "float32 `[N, 1]`, the fraud probability. Feature order: "
                + ", ".join(f"`{n}`" for n in SCREENING_FEATURE_NAMES)
                + "."
            ),
            architecture=(
                "scikit-learn `HistGradientBoostingClassifier` "
                f"({config.stage1_iterations} trees, 31 leaves, learning rate 0.08) trained on "
                "every training-period transaction, unweighted (scores are calibrated to the "
                "simulated fraud rate); converted with skl2onnx (no ZipMap, opset 17) plus a "
                f"Slice to the positive class. ONNX vs scikit-learn max |diff| {s1_diff:.2e}."
            ),
            config=config,
            data=data_info,
            table=s1_table,
            timing=s1_timing,
            eval_note="Every held-out transaction.",
        ),
        encoding="utf-8",
    )
    n_params = sum(p.numel() for p in net.parameters())
    (s2_dir / "model_card.md").write_text(
        _model_card(
            title="Stage 2 heavyweight sequence model",
            version=config.stage2_version,
            path=s2_path,
            inputs=(
                f"input `sequence` float32 `[N, {SEQUENCE_LEN}, {TOKEN_DIM}]` (the card's last "
                f"{HISTORY_LEN} transactions oldest first, left-padded with zeros, then the "
                "current one) -> output `score` float32 `[N, 1]`, the fraud probability. Token "
                "channels: " + ", ".join(f"`{n}`" for n in TOKEN_FEATURE_NAMES) + ". Served by "
                f"Triton as `{TRITON_MODEL_NAME}` version {config.triton_version}."
            ),
            architecture=(
                f"Pre-norm transformer encoder, d={heavy_config.d_model}, "
                f"{heavy_config.n_layers} layers, {heavy_config.n_heads} heads, feed-forward "
                f"{heavy_config.ff_dim}, learned positions, padding-masked attention; head on the "
                f"current token + masked mean pool; {n_params:,} parameters. Trained "
                f"{heavy_config.epochs} epochs (AdamW, one-cycle) on {len(s2_idx)} sequences: all "
                f"{len(train_pos)} training fraud + {len(neg_idx)} genuine (half from stage 1's "
                "top 10%, half from the rest); importance-weighted Platt scaling folded into the "
                f"graph. ONNX opset 17, dynamic batch. ONNX vs PyTorch max |diff| {s2_diff:.2e}."
            ),
            config=config,
            data=data_info,
            table=s2_table,
            timing=s2_timing,
            eval_note=(
                f"All held-out fraud plus {n_eval_neg} genuine transactions sampled from "
                "two strata of stage-1 score and weighted back to the real mix."
            ),
        ),
        encoding="utf-8",
    )
    policy_path.parent.mkdir(parents=True, exist_ok=True)
    policy_path.write_text(
        json.dumps(policy.model_dump(exclude_none=True), indent=2) + "\n", encoding="utf-8"
    )
    registry = {
        "feature_set": FEATURE_SET_VERSION,
        "policy": policy_path.relative_to(model_dir).as_posix(),
        "stage1": {
            "version": config.stage1_version,
            "path": s1_path.relative_to(model_dir).as_posix(),
            "sha256": sha256_file(s1_path),
        },
        "stage2": {
            "version": config.stage2_version,
            "triton_model": TRITON_MODEL_NAME,
            "triton_version": config.triton_version,
            "path": s2_path.relative_to(model_dir).as_posix(),
            "sha256": sha256_file(s2_path),
        },
    }
    (model_dir / REGISTRY_FILE).write_text(json.dumps(registry, indent=2) + "\n", encoding="utf-8")
    metrics = {
        "stage1": s1_table,
        "stage2": s2_table,
        "cascade": cascade_table,
        "stage1_timing": s1_timing,
        "stage2_timing": s2_timing,
        "escalated_share": float(np.mean(s1_hold >= policy.escalate_low)),
        **data_info,
    }
    return TrainResult(model_dir, metrics, policy, time.perf_counter() - started)
