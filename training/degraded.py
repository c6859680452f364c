"""Decisions when the card's history cannot be read: measure the options, choose one, version it.

This module owns ``python -m training degraded-report``. When Redis is slow or down the
orchestrator has no card history and no output cache (``FEATURES_UNAVAILABLE``); stage 1 then
reads the transaction alone. The normal thresholds were chosen for scores computed *with*
history, and on an empty history almost every fraud scores under them, so the degraded answer
needs a policy of its own (the ``features_unavailable`` section of a policy file,
:class:`cascade.model_registry.FeaturesUnavailable`).

Candidates, each an instance of that section (or the normal policy for the baseline), so what is
measured is exactly what would be served:

* ``a`` the current behaviour: the normal policy (band, thresholds) on the empty-history scores;
* ``b`` stage 1 on the empty history, its own thresholds: REVIEW at a stated false-positive budget
  (5%, 20%), or at the highest threshold that keeps a recall floor on every fraud pattern;
* ``c`` as ``b`` with the top of the empty-history stage-1 scores escalated to stage 2 on an
  empty-history sequence (the normal policy's escalation rate);
* ``d`` REVIEW everything.

Thresholds are picked on a *separate* calibration stream (the ``calibrate`` command's seed and
window); every number in the report is measured on the held-out window the models never saw
(days 65-89 of the training stream), on every transaction of it (no sampling: stage 2 only runs
on the escalated rows). DECLINE thresholds keep the normal policy's budget of 0.1% genuine
declined. The option served: among those that keep the recall floor on every pattern of the
calibration stream, the one sending the fewest genuine transactions to REVIEW or DECLINE there;
shares within :data:`EQUAL_LOAD` count as equal, and then the option that does not ask stage 2
wins, then the one declining more fraud.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, Context
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np

from cascade.features import screening_features, sequence_tensor
from cascade.model_registry import (
    REGISTRY_FILE,
    FeaturesUnavailable,
    Policy,
    load_policy,
    load_registry,
)
from training.datasets import replay_screening, replay_sequences
from training.evaluation import stage1_scores, stage2_scores, threshold_at_fpr
from training.simulator import SIMULATOR_VERSION, FraudPattern, SimulationConfig, simulate

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from cascade.model_registry import Registry
    from training.simulator import LabelledTransaction

__all__ = [
    "DECLINE_FPR",
    "RECALL_FLOOR",
    "DegradedReport",
    "Option",
    "Outcome",
    "Window",
    "candidate_sections",
    "decisions",
    "outcome",
    "write_degraded_report",
]

logger = logging.getLogger(__name__)

# A degraded answer may not let through more fraud than the full cascade does: policy-1 sends
# 98.7% of held-out fraud to REVIEW or DECLINE, so every pattern must keep at least this much.
RECALL_FLOOR: Final = 0.99
# DECLINE keeps the normal policy's budget (policy-1 declines 0.12% of genuine traffic).
DECLINE_FPR: Final = 0.001
# Genuine shares sent to REVIEW/DECLINE closer than this count as equal: then the option that
# does not ask stage 2 wins (its tier is sized for the normal escalation, and spared in an
# outage), then the one declining more fraud.
EQUAL_LOAD: Final = 0.01
# REVIEW budgets shown for comparison with the recall floor.
REVIEW_FPR_BUDGETS: Final = (0.05, 0.20)
HELD_OUT = SimulationConfig()
HELD_OUT_FIRST_DAY: Final = 65
CALIBRATION = SimulationConfig(seed=1007, n_cards=4000, n_days=60)
CALIBRATION_FIRST_DAY: Final = 14

APPROVE, REVIEW, DECLINE = 0, 1, 2
_MS_DAY: Final = 86_400_000


@dataclass(slots=True)
class Window:
    """Every transaction of a window, scored by stage 1 on an empty history."""

    records: list[LabelledTransaction]
    labels: NDArray[np.int8]
    patterns: NDArray[np.str_]
    stage1_empty: NDArray[np.float64]
    _stage2_empty: dict[int, float] = field(default_factory=dict)

    def stage2_empty(self, stage2_path: Path, rows: NDArray[np.int64]) -> NDArray[np.float64]:
        """Stage 2 on an empty-history sequence for ``rows`` (computed once per row)."""
        missing = np.array([i for i in rows.tolist() if i not in self._stage2_empty], np.int64)
        if len(missing):
            sequences = np.stack([sequence_tensor(self.records[i].tx, ()) for i in missing])
            scores = stage2_scores(stage2_path, sequences)
            self._stage2_empty.update(zip(missing.tolist(), scores.tolist(), strict=True))
        return np.array([self._stage2_empty[i] for i in rows.tolist()], dtype=np.float64)


def _window(
    registry: Registry, records: list[LabelledTransaction], first_day: int
) -> tuple[Window, NDArray[np.int64]]:
    start = records[0].tx.timestamp_ms
    rows = np.array(
        [i for i, r in enumerate(records) if (r.tx.timestamp_ms - start) // _MS_DAY >= first_day],
        dtype=np.int64,
    )
    kept = [records[i] for i in rows]
    features = np.stack([screening_features(r.tx, ()) for r in kept])
    window = Window(
        records=kept,
        labels=np.fromiter((r.is_fraud for r in kept), dtype=np.int8, count=len(kept)),
        patterns=np.array([r.pattern for r in kept], dtype=np.str_),
        stage1_empty=stage1_scores(registry.stage1_path, features).astype(np.float64),
    )
    return window, rows


def decisions(
    window: Window, stage2_path: Path, policy: Policy | FeaturesUnavailable | None
) -> NDArray[np.int8]:
    """What ``policy`` answers for every row of ``window`` when features are unavailable
    (``None``: REVIEW everything); the comparisons of :meth:`Policy.decide`, vectorised."""
    s1 = window.stage1_empty
    if policy is None:
        return np.full(len(s1), REVIEW, dtype=np.int8)
    if isinstance(policy, FeaturesUnavailable):
        policy = policy.as_policy("candidate")
    final = s1.copy()
    band = np.flatnonzero((s1 >= policy.escalate_low) & (s1 < policy.escalate_high))
    if len(band):
        final[band] = window.stage2_empty(stage2_path, band)
    out = np.where(final >= policy.review_threshold, REVIEW, APPROVE).astype(np.int8)
    out[final >= policy.decline_threshold] = DECLINE
    return out


def _floor6(value: float) -> float:
    """``value`` rounded down to 6 significant digits (a REVIEW cut may only move down)."""
    return float(Context(prec=6, rounding=ROUND_FLOOR).create_decimal(value))


def _ceil6(value: float) -> float:
    """``value`` rounded up to 6 significant digits (a DECLINE cut may only move up)."""
    return float(Context(prec=6, rounding=ROUND_CEILING).create_decimal(value))


def _floor_threshold(scores: NDArray[np.float64], window: Window, floor: float) -> float:
    """Highest threshold at which every fraud pattern keeps ``floor`` of its fraud flagged."""
    cuts = []
    for pattern in FraudPattern:
        own = np.sort(scores[window.patterns == pattern.value])[::-1]
        if len(own):
            cuts.append(float(own[int(np.ceil(floor * len(own))) - 1]))
    return _floor6(min(cuts))


def _fpr_threshold(scores: NDArray[np.float64], window: Window, fpr: float) -> float:
    ones = np.ones(len(scores))
    return _ceil6(threshold_at_fpr(scores.astype(np.float32), window.labels, ones, fpr))


def _section(
    scores: NDArray[np.float64], window: Window, review: float, band: tuple[float, float] | None
) -> FeaturesUnavailable:
    decline = max(_fpr_threshold(scores, window, DECLINE_FPR), review)
    if band is None:
        return FeaturesUnavailable(review_threshold=review, decline_threshold=decline)
    return FeaturesUnavailable(
        review_threshold=review,
        decline_threshold=decline,
        escalate=True,
        escalate_low=band[0],
        escalate_high=band[1],
    )


@dataclass(frozen=True, slots=True)
class Option:
    """One candidate: a name, what it is, and the section that serves it (None: REVIEW all)."""

    key: str
    label: str
    serves: Policy | FeaturesUnavailable | None


def candidate_sections(calibration: Window, stage2_path: Path, policy: Policy) -> list[Option]:
    """Every candidate, its thresholds picked on the ``calibration`` window."""
    s1 = calibration.stage1_empty
    options = [
        Option(
            "a",
            f"no section (as before it, e.g. policy-1): `{policy.version}`'s normal band and "
            "thresholds on the empty history",
            policy,
        )
    ]
    for budget in REVIEW_FPR_BUDGETS:
        review = _fpr_threshold(s1, calibration, budget)
        options.append(
            Option(
                f"b{budget:.0%}",
                f"stage 1, REVIEW at {budget:.0%} FPR budget",
                _section(s1, calibration, review, None),
            )
        )
    options.append(
        Option(
            "b-floor",
            f"stage 1, REVIEW at recall floor {RECALL_FLOOR:.0%} per pattern",
            _section(s1, calibration, _floor_threshold(s1, calibration, RECALL_FLOOR), None),
        )
    )
    # (c): escalate the top of the empty-history stage-1 scores at the normal policy's rate.
    normal_rate = float(np.mean(s1 >= policy.escalate_low))  # tiny on empty history: use 8%
    rate = max(normal_rate, 0.08)
    low = _floor6(float(np.quantile(s1, 1.0 - rate)))
    band_rows = np.flatnonzero(s1 >= low)
    final = s1.copy()
    final[band_rows] = calibration.stage2_empty(stage2_path, band_rows)
    options.append(
        Option(
            "c-floor",
            f"stage 1 + stage 2 on empty history (top {rate:.0%} escalated), recall floor "
            f"{RECALL_FLOOR:.0%} per pattern",
            _section(
                final, calibration, _floor_threshold(final, calibration, RECALL_FLOOR), (low, 1.0)
            ),
        )
    )
    options.append(Option("d", "REVIEW everything", None))
    return options


@dataclass(frozen=True, slots=True)
class Outcome:
    """Shares of an option's decisions, overall and per pattern."""

    recall: dict[str, float]  # pattern ("all") -> share of fraud sent to REVIEW or DECLINE
    recall_decline: dict[str, float]
    genuine_review: float
    genuine_decline: float
    escalated: float


def outcome(answers: NDArray[np.int8], window: Window, escalated: float) -> Outcome:
    """What ``answers`` do to the fraud (per pattern) and genuine traffic of ``window``."""
    genuine = window.labels == 0
    recall, recall_decline = {}, {}
    for name in ["all", *(p.value for p in FraudPattern)]:
        rows = (window.labels == 1) if name == "all" else (window.patterns == name)
        if rows.any():
            recall[name] = float(np.mean(answers[rows] >= REVIEW))
            recall_decline[name] = float(np.mean(answers[rows] == DECLINE))
    return Outcome(
        recall=recall,
        recall_decline=recall_decline,
        genuine_review=float(np.mean(answers[genuine] == REVIEW)),
        genuine_decline=float(np.mean(answers[genuine] == DECLINE)),
        escalated=escalated,
    )


def _escalated_share(window: Window, serves: Policy | FeaturesUnavailable | None) -> float:
    if serves is None:
        return 0.0
    if isinstance(serves, FeaturesUnavailable):
        serves = serves.as_policy("candidate")
    s1 = window.stage1_empty
    return float(np.mean((s1 >= serves.escalate_low) & (s1 < serves.escalate_high)))


@dataclass(frozen=True, slots=True)
class DegradedReport:
    """What ``degraded-report`` measured and chose."""

    path: Path
    chosen: Option
    section: FeaturesUnavailable
    held_out: dict[str, Outcome]
    calibration: dict[str, Outcome]


def _reference(
    registry: Registry,
    policy: Policy,
    records: list[LabelledTransaction],
    rows: NDArray[np.int64],
    window: Window,
) -> Outcome:
    """The normal cascade *with* history on the same window (what an outage gives up)."""
    data = replay_screening(records)
    s1 = stage1_scores(registry.stage1_path, data.features[rows]).astype(np.float64)
    final = s1.copy()
    band = np.flatnonzero((s1 >= policy.escalate_low) & (s1 < policy.escalate_high))
    final[band] = stage2_scores(registry.stage2_path, replay_sequences(records, rows[band]))
    answers = np.where(final >= policy.review_threshold, REVIEW, APPROVE).astype(np.int8)
    answers[final >= policy.decline_threshold] = DECLINE
    return outcome(answers, window, len(band) / len(rows))


def _pct(value: float, digits: int = 1) -> str:
    return f"{value * 100:.{digits}f}%"


def write_degraded_report(
    model_dir: Path,
    docs_dir: Path,
    *,
    write_policy: str | None = None,
    activate: bool = False,
) -> DegradedReport:
    """Measure the options, write ``docs/degraded_policy.md``; with ``write_policy``, also a new
    policy version (the active policy's thresholds plus the chosen section), made active with
    ``activate``."""
    started = time.perf_counter()
    registry = load_registry(model_dir)
    active = load_policy(registry.policy_path)
    normal = active.model_copy(update={"features_unavailable": None})
    stage2_path = registry.stage2_path

    calib_records = simulate(CALIBRATION)
    calibration, _ = _window(registry, calib_records, CALIBRATION_FIRST_DAY)
    del calib_records
    options = candidate_sections(calibration, stage2_path, normal)
    if active.features_unavailable is not None:
        options.append(
            Option(
                "served", f"served now: `{active.version}`'s section", active.features_unavailable
            )
        )

    records = simulate(HELD_OUT)
    held_out, rows = _window(registry, records, HELD_OUT_FIRST_DAY)
    reference = _reference(registry, normal, records, rows, held_out)
    del records

    held: dict[str, Outcome] = {}
    calib: dict[str, Outcome] = {}
    answers_by_key: dict[str, NDArray[np.int8]] = {}
    for option in options:
        answers_by_key[option.key] = decisions(held_out, stage2_path, option.serves)
        held[option.key] = outcome(
            answers_by_key[option.key], held_out, _escalated_share(held_out, option.serves)
        )
        calib[option.key] = outcome(
            decisions(calibration, stage2_path, option.serves),
            calibration,
            _escalated_share(calibration, option.serves),
        )

    def keeps_floor(key: str) -> bool:
        return all(v >= RECALL_FLOOR for k, v in calib[key].recall.items() if k != "all")

    def flagged(key: str) -> float:
        return calib[key].genuine_review + calib[key].genuine_decline

    eligible = [o for o in options if o.key != "served" and keeps_floor(o.key)]
    best = min(flagged(o.key) for o in eligible)
    near = [o for o in eligible if flagged(o.key) <= best + EQUAL_LOAD]
    chosen = min(
        near,
        key=lambda o: (
            _escalated_share(calibration, o.serves) > 0,
            -calib[o.key].recall_decline["all"],
        ),
    )
    section = (
        chosen.serves
        if isinstance(chosen.serves, FeaturesUnavailable)
        else FeaturesUnavailable(review_threshold=0.0, decline_threshold=1.0)
    )
    more_permissive = int(np.sum(answers_by_key[chosen.key] < answers_by_key["a"]))
    fraud_more_permissive = int(
        np.sum((answers_by_key[chosen.key] < answers_by_key["a"]) & (held_out.labels == 1))
    )

    written: Path | None = None
    if write_policy is not None:
        written = _write_policy(model_dir, normal, write_policy, section, activate=activate)

    lines = _render(
        registry,
        normal,
        active,
        options,
        held,
        calib,
        reference,
        held_out,
        calibration,
        chosen,
        section,
        more_permissive,
        fraud_more_permissive,
        written,
    )
    docs_dir.mkdir(parents=True, exist_ok=True)
    path = docs_dir / "degraded_policy.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    logger.info("degraded report in %.0f s", time.perf_counter() - started)
    return DegradedReport(path, chosen, section, held, calib)


def _write_policy(
    model_dir: Path, normal: Policy, version: str, section: FeaturesUnavailable, *, activate: bool
) -> Path:
    path = model_dir / "policies" / f"{version}.json"
    if path.exists():
        raise FileExistsError(f"{path} exists: policy versions are immutable")
    policy = normal.model_copy(update={"version": version, "features_unavailable": section})
    Policy.model_validate(policy.model_dump())
    path.write_text(json.dumps(policy.model_dump(exclude_none=True), indent=2) + "\n", "utf-8")
    if activate:
        registry_path = model_dir / REGISTRY_FILE
        doc = json.loads(registry_path.read_text(encoding="utf-8"))
        doc["policy"] = path.relative_to(model_dir).as_posix()
        registry_path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return path


def _render(
    registry: Registry,
    normal: Policy,
    active: Policy,
    options: list[Option],
    held: dict[str, Outcome],
    calib: dict[str, Outcome],
    reference: Outcome,
    held_out: Window,
    calibration: Window,
    chosen: Option,
    section: FeaturesUnavailable,
    more_permissive: int,
    fraud_more_permissive: int,
    written: Path | None,
) -> list[str]:
    n, n_fraud = len(held_out.labels), int(held_out.labels.sum())
    c_n, c_fraud = len(calibration.labels), int(calibration.labels.sum())
    patterns = [p.value for p in FraudPattern if p.value in held[options[0].key].recall]
    lines = [
        "# Decisions when features are unavailable (Redis slow or down)",
        "",
        f"Generated by `python -m training degraded-report` on {datetime.now(UTC):%Y-%m-%d %H:%M} "
        "UTC (about 2 min on 2 cores; `--write-policy policy-N [--activate]` also writes the "
        "chosen section into a new policy version). Do not edit by hand.",
        "",
        "## What was measured",
        f"- Models: stage 1 `{registry.stage1.version}`, stage 2 `{registry.stage2.version}`; "
        f"normal band and thresholds of `{normal.version}` (the section aside); active policy "
        f"`{active.version}`.",
        "- When the Redis lookup fails the orchestrator has no card history: stage 1 reads "
        "the transaction alone (`screening_features(tx, [])`) and stage 2, if asked, a sequence "
        "holding only the transaction.",
        f"- Held-out window: simulator `{SIMULATOR_VERSION}` seed {HELD_OUT.seed}, "
        f"{HELD_OUT.n_cards} cards, days {HELD_OUT_FIRST_DAY}-{HELD_OUT.n_days - 1} (never seen "
        f"in training): {n:,} transactions, {n_fraud:,} fraud; every transaction scored, no "
        "sampling (stage 2 runs on the escalated rows only).",
        f"- Thresholds picked on a separate calibration stream (seed {CALIBRATION.seed}, "
        f"{CALIBRATION.n_cards} cards, days {CALIBRATION_FIRST_DAY}-{CALIBRATION.n_days - 1}: "
        f"{c_n:,} transactions, {c_fraud:,} fraud), never on the held-out window. DECLINE "
        f"thresholds at {DECLINE_FPR:.1%} genuine declined there (the normal budget).",
        "- Recall = share of fraud sent to REVIEW or DECLINE (and to DECLINE alone); FPR = share "
        "of genuine sent to REVIEW, to DECLINE.",
        "",
        "## Options on the held-out window",
        "",
        "| option | what | fraud -> REVIEW/DECLINE | fraud -> DECLINE | genuine -> REVIEW | "
        "genuine -> DECLINE | escalated |",
        "|---|---|---:|---:|---:|---:|---:|",
        f"| ref | normal cascade `{normal.version}` *with* history (no outage) | "
        f"{_pct(reference.recall['all'])} | {_pct(reference.recall_decline['all'])} | "
        f"{_pct(reference.genuine_review, 2)} | {_pct(reference.genuine_decline, 2)} | "
        f"{_pct(reference.escalated)} |",
    ]
    for o in options:
        m = held[o.key]
        mark = " **(chosen)**" if o.key == chosen.key else ""
        lines.append(
            f"| {o.key}{mark} | {o.label} | {_pct(m.recall['all'])} | "
            f"{_pct(m.recall_decline['all'])} | {_pct(m.genuine_review, 2)} | "
            f"{_pct(m.genuine_decline, 2)} | {_pct(m.escalated)} |"
        )
    lines += [
        "",
        "## Per fraud pattern (held-out): fraud -> REVIEW/DECLINE, (-> DECLINE)",
        "",
        "| pattern | fraud | ref | " + " | ".join(o.key for o in options) + " |",
        "|---|---:|---:|" + "---:|" * len(options),
    ]
    for p in patterns:
        count = int(np.sum(held_out.patterns == p))
        cells = [
            f"{_pct(held[o.key].recall[p])} ({_pct(held[o.key].recall_decline[p])})"
            for o in options
        ]
        lines.append(
            f"| {p} | {count} | {_pct(reference.recall[p])} "
            f"({_pct(reference.recall_decline[p])}) | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "## Thresholds (picked on the calibration stream) and the choice",
        "",
        "| option | section | min pattern recall (calib) | genuine -> REVIEW/DECLINE (calib) |",
        "|---|---|---:|---:|",
    ]
    for o in options:
        served = (
            "REVIEW every answer"
            if o.serves is None
            else f"`{json.dumps(o.serves.model_dump(exclude_none=True))}`"
            if isinstance(o.serves, FeaturesUnavailable)
            else f"`{o.serves.version}`'s normal band and thresholds, no section"
        )
        m = calib[o.key]
        worst = min(v for k, v in m.recall.items() if k != "all")
        lines.append(
            f"| {o.key} | {served} | {_pct(worst)} | "
            f"{_pct(m.genuine_review + m.genuine_decline, 2)} |"
        )
    h = held[chosen.key]
    lines += [
        "",
        f"Rule: among the options that keep at least {RECALL_FLOOR:.0%} of every fraud pattern "
        "at REVIEW or DECLINE on the calibration stream (a degraded answer may not let through "
        f"more fraud than the full cascade, which sends {_pct(reference.recall['all'])} there), "
        "the one sending the fewest genuine transactions to REVIEW or DECLINE there; shares "
        f"within {EQUAL_LOAD:.0%} of traffic count as equal, and then the option that does not "
        "ask stage 2 wins (its tier is sized for the normal escalation and is better spared in "
        "an outage), then the one declining more fraud.",
        "",
        f"**Chosen: {chosen.key}, {chosen.label}.** Served as the policy section "
        f'`"features_unavailable": {json.dumps(section.model_dump(exclude_none=True))}`. '
        f"On the held-out window it sends {_pct(h.recall['all'])} of fraud to REVIEW or DECLINE "
        f"({_pct(h.recall_decline['all'])} DECLINE) against {_pct(held['a'].recall['all'])} "
        f"({_pct(held['a'].recall_decline['all'])}) without a section, at the cost of "
        f"{_pct(h.genuine_review)} of genuine traffic sent to REVIEW and "
        f"{_pct(h.genuine_decline, 2)} declined while the outage lasts. It answers more "
        f"permissively than option a on {more_permissive:,} held-out transactions "
        f"({fraud_more_permissive:,} of them fraud).",
        "",
        "How to read this: without history, stage 1 still sees what the transaction itself "
        "says (channel, amount, merchant category, hour, device and IP fields), which exposes "
        "card testing, account takeover and enrolled-device fraud (all e-commerce here); "
        "impossible travel and compromised merchants are only visible against the card's own "
        "past, so keeping them means reviewing most card-present and ATM traffic. What the chosen "
        "thresholds let through unreviewed is what the simulator never makes fraudulent (for "
        "example most contactless and recurring payments): on real traffic that is an "
        "assumption to re-measure, and the REVIEW load during an outage is the price.",
        "",
    ]
    if written is not None:
        lines += [f"Written: `{written.relative_to(written.parents[1]).as_posix()}`.", ""]
    if active.features_unavailable is not None:
        same = active.features_unavailable == section
        lines += [
            f"Active policy `{active.version}` serves "
            f"`{json.dumps(active.features_unavailable.model_dump(exclude_none=True))}`: "
            f"{'the chosen section' if same else 'NOT the chosen section'}.",
            "",
        ]
    return lines
