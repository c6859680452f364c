"""Reduced-precision variants of the stage-2 model, with an accuracy guardrail.

This module owns making the INT8 and FP16 variants of a stage-2 ONNX file, measuring them against
the FP32 original on an evaluation set, and recording the outcome in
``models/heavy/variants.json``, which the guardrail test re-checks. A variant is marked
``servable`` only if it passes every guardrail of :mod:`training.guardrails` on the same
weighted sample as the original: PR-AUC within ``pr_auc_margin``, decisions at the registered
policy's thresholds flipped for at most ``max_flip_rate`` of escalated transactions, recall of
every fraud pattern within ``recall_margin``, and no score further than ``max_abs_score_diff``
from the original's. The tensor contract (float32 in, float32 out) is unchanged, so a servable
variant can be put in the registry as ``stage2`` without touching serving code.

- INT8: ``onnxruntime.quantization.quantize_dynamic`` (weights int8 per tensor, activations
  quantized on the fly). Meant for CPU serving.
- FP16: ``onnxruntime.transformers.float16.convert_float_to_float16`` with ``keep_io_types`` (the
  graph computes in half precision behind Cast nodes). Meant for GPU serving (Triton / TensorRT):
  on a CPU it runs, but slower than FP32.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.float16 import convert_float_to_float16

from cascade.model_registry import sha256_file
from training.datasets import average_precision, recall_at_fpr
from training.evaluation import VARIANTS_FILE, compare_latency, stage2_scores
from training.guardrails import DEFAULT_BOUNDS, GuardrailBounds, GuardrailResult, check_variant

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from cascade.model_registry import Policy
    from training.evaluation import EvalSet

__all__ = [
    "DEFAULT_PR_AUC_MARGIN",
    "VARIANTS_FILE",
    "VariantResult",
    "make_fp16",
    "make_int8",
    "make_variants",
    "score_variant",
]

logger = logging.getLogger(__name__)

DEFAULT_PR_AUC_MARGIN: Final = DEFAULT_BOUNDS.pr_auc_margin


@dataclass(frozen=True, slots=True)
class VariantResult:
    """One variant measured against its FP32 baseline on the same weighted sample."""

    version: str
    precision: str
    path: Path
    pr_auc: float
    baseline_pr_auc: float
    recall_at_1pct_fpr: float
    baseline_recall_at_1pct_fpr: float
    max_abs_score_diff: float
    latency_b1_ms: float
    baseline_latency_b1_ms: float
    latency_b32_ms: float
    baseline_latency_b32_ms: float
    guardrails: GuardrailResult

    @property
    def servable(self) -> bool:
        """Every guardrail holds."""
        return self.guardrails.servable


def make_int8(source: Path, target: Path) -> None:
    """Dynamic INT8 quantization of ``source`` into ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # quantize_dynamic writes helper files next to its output: keep them out of models/.
        out = Path(tmp) / "model.onnx"
        quantize_dynamic(source, out, weight_type=QuantType.QInt8)
        shutil.copyfile(out, target)


def make_fp16(source: Path, target: Path) -> None:
    """FP16 conversion of ``source`` into ``target``, keeping float32 inputs and outputs."""
    target.parent.mkdir(parents=True, exist_ok=True)
    converted = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    _sort_topologically(converted.graph)
    onnx.checker.check_model(converted)
    onnx.save(converted, str(target))


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so every node follows its inputs' producers (the converter appends
    its input Casts at the end, which onnxruntime tolerates but the ONNX checker rejects)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        if not ready:
            raise ValueError("graph has a cycle or a dangling input")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)


def score_variant(path: Path, sequences: NDArray[np.float32]) -> NDArray[np.float32]:
    """Scores of a stage-2 variant (same contract as the original)."""
    return stage2_scores(path, sequences)


def _measure(
    version: str,
    precision: str,
    path: Path,
    baseline: Path,
    eval_set: EvalSet,
    policy: Policy,
    bounds: GuardrailBounds,
) -> VariantResult:
    if eval_set.sequences is None or eval_set.stage2 is None:
        raise ValueError("the eval set needs sequences and baseline stage-2 scores")
    sequences = eval_set.sequences
    scores = score_variant(path, sequences)
    labels, weights = eval_set.labels, eval_set.sample_weight
    pr_auc = average_precision(scores, labels, weights)
    base_pr_auc = average_precision(eval_set.stage2, labels, weights)
    guardrails = check_variant(
        policy,
        stage1=eval_set.stage1,
        baseline=eval_set.stage2,
        variant=scores,
        labels=labels,
        patterns=eval_set.patterns,
        weights=weights,
        pr_auc=pr_auc,
        baseline_pr_auc=base_pr_auc,
        bounds=bounds,
    )
    b1, b1_base = compare_latency([path, baseline], sequences[:1])
    b32, b32_base = compare_latency([path, baseline], sequences[:32], runs=15)
    return VariantResult(
        version=version,
        precision=precision,
        path=path,
        pr_auc=pr_auc,
        baseline_pr_auc=base_pr_auc,
        recall_at_1pct_fpr=recall_at_fpr(scores, labels, 0.01, weights),
        baseline_recall_at_1pct_fpr=recall_at_fpr(eval_set.stage2, labels, 0.01, weights),
        max_abs_score_diff=guardrails.max_abs_score_diff,
        latency_b1_ms=b1,
        baseline_latency_b1_ms=b1_base,
        latency_b32_ms=b32,
        baseline_latency_b32_ms=b32_base,
        guardrails=guardrails,
    )


def make_variants(
    model_dir: Path,
    baseline_version: str,
    baseline_path: Path,
    eval_set: EvalSet,
    policy: Policy,
    *,
    bounds: GuardrailBounds = DEFAULT_BOUNDS,
) -> list[VariantResult]:
    """Build, measure (at ``policy``'s thresholds) and record the INT8 and FP16 variants of
    ``baseline_path``."""
    results = []
    for precision, suffix, build in (("int8", "int8", make_int8), ("fp16", "fp16", make_fp16)):
        version = f"{baseline_version}-{suffix}"
        path = model_dir / "heavy" / version / "model.onnx"
        build(baseline_path, path)
        result = _measure(version, precision, path, baseline_path, eval_set, policy, bounds)
        logger.info(
            "%s: PR-AUC %.4f vs %.4f, b1 %.3f vs %.3f ms, servable=%s",
            version,
            result.pr_auc,
            result.baseline_pr_auc,
            result.latency_b1_ms,
            result.baseline_latency_b1_ms,
            result.servable,
        )
        for failure in result.guardrails.failures:
            logger.warning("%s is not servable: %s", version, failure)
        (path.parent / "model_card.md").write_text(
            _card(result, baseline_version, policy.version, bounds)
        )
        results.append(result)
    manifest: dict[str, Any] = {
        "baseline": baseline_version,
        "baseline_sha256": sha256_file(baseline_path),
        "policy": policy.version,
        "pr_auc_margin": bounds.pr_auc_margin,
        "max_flip_rate": bounds.max_flip_rate,
        "recall_margin": bounds.recall_margin,
        "max_abs_score_diff": bounds.max_abs_score_diff,
        "variants": [
            {
                "version": r.version,
                "precision": r.precision,
                "path": r.path.relative_to(model_dir).as_posix(),
                "sha256": sha256_file(r.path),
                "servable": r.servable,
                "pr_auc": round(r.pr_auc, 5),
                "baseline_pr_auc": round(r.baseline_pr_auc, 5),
                "flip_rate_escalated": round(r.guardrails.flip_rate_escalated, 6),
                "flip_rate_all": round(r.guardrails.flip_rate_all, 7),
                "max_abs_score_diff": round(r.max_abs_score_diff, 6),
                "pattern_recall": {
                    p.pattern: {
                        "caught": round(p.caught, 4),
                        "baseline_caught": round(p.baseline_caught, 4),
                        "declined": round(p.declined, 4),
                        "baseline_declined": round(p.baseline_declined, 4),
                    }
                    for p in r.guardrails.patterns
                },
                "failures": list(r.guardrails.failures),
            }
            for r in results
        ],
    }
    (model_dir / VARIANTS_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return results


def _card(r: VariantResult, baseline: str, policy_version: str, bounds: GuardrailBounds) -> str:
    how = {
        "int8": "onnxruntime `quantize_dynamic` (weights int8, activations quantized at run time)",
        "fp16": "onnxruntime `convert_float_to_float16`, float32 inputs/outputs kept",
    }[r.precision]
    g = r.guardrails
    pattern_rows = "\n".join(
        f"| {p.pattern} | {p.frauds} | {p.caught:.3f} | {p.baseline_caught:.3f} | "
        f"{p.declined:.3f} | {p.baseline_declined:.3f} |"
        for p in g.patterns
    )
    failures = "".join(f"\n- NOT servable: {f}" for f in g.failures)
    return f"""# Stage 2 heavyweight sequence model — `{r.version}` ({r.precision.upper()} variant)

| | |
|---|---|
| version | `{r.version}` |
| derived from | `{baseline}` by {how} |
| sha256 | `{sha256_file(r.path)}` |
| tensor contract | unchanged: `sequence` float32 `[N, 65, TOKEN_DIM]` -> `score` float32 `[N, 1]` |
| servable | **{"yes" if r.servable else "no"}** (every guardrail below) |

## Accuracy against `{baseline}` (same weighted held-out sample)
| | {r.precision.upper()} | FP32 |
|---|---:|---:|
| PR-AUC | {r.pr_auc:.4f} | {r.baseline_pr_auc:.4f} |
| recall @1% FPR | {r.recall_at_1pct_fpr:.4f} | {r.baseline_recall_at_1pct_fpr:.4f} |
| max abs score diff | {r.max_abs_score_diff:.2e} (bound {bounds.max_abs_score_diff}) | |

## Decisions at the thresholds of `{policy_version}`
| guardrail | measured | bound |
|---|---:|---:|
| PR-AUC loss | {r.baseline_pr_auc - r.pr_auc:+.4f} | {bounds.pr_auc_margin} |
| escalated decisions flipped | {g.flip_rate_escalated:.3%} | {bounds.max_flip_rate:.3%} |
| all decisions flipped | {g.flip_rate_all:.4%} | |

| fraud pattern | frauds | REVIEW or DECLINE | (FP32) | DECLINE | (FP32) |
|---|---:|---:|---:|---:|---:|
{pattern_rows}
{failures}
## Latency (onnxruntime CPU, one thread; best of 7 interleaved rounds of medians)
| batch | {r.precision.upper()} | FP32 |
|---|---:|---:|
| 1 | {r.latency_b1_ms:.3f} ms | {r.baseline_latency_b1_ms:.3f} ms |
| 32 | {r.latency_b32_ms:.3f} ms | {r.baseline_latency_b32_ms:.3f} ms |
"""
