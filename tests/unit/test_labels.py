"""The simulator's label-delay model: shares and delays as documented, deterministic."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cascade.outcome_record import parse_outcome_file
from cascade.transaction import Channel, Transaction
from training.labels import simulate_outcomes, write_outcome_csv
from training.simulator import LabelledTransaction

DAY_MS = 86_400_000


def stream(n_fraud: int, n_genuine: int) -> list[LabelledTransaction]:
    def tx(i: int) -> Transaction:
        return Transaction(
            transaction_id=f"tx-{i}",
            card_id="c",
            merchant_id="m",
            merchant_category="5411",
            amount_minor=100,
            currency="EUR",
            country="DE",
            channel=Channel.ECOMMERCE,
            timestamp_ms=1_767_225_600_000,
        )

    return [LabelledTransaction(tx(i), True, "account_takeover") for i in range(n_fraud)] + [
        LabelledTransaction(tx(n_fraud + i), False) for i in range(n_genuine)
    ]


def test_shares_and_delays() -> None:
    records = stream(4000, 20_000)
    outcomes = list(simulate_outcomes(records, seed=3))
    assert outcomes == list(simulate_outcomes(records, seed=3))
    by_kind: dict[str, list[float]] = {}
    for o in outcomes:
        by_kind.setdefault(o.label, []).append((o.reported_at_ms - 1_767_225_600_000) / DAY_MS)
    fraud_labelled = len(by_kind["chargeback"]) + len(by_kind["confirmed_fraud"])
    assert 0.87 < fraud_labelled / 4000 < 0.93  # 10% never labelled
    assert 0.27 < len(by_kind["confirmed_fraud"]) / fraud_labelled < 0.33
    assert 0.015 < len(by_kind["genuine"]) / 20_000 < 0.025
    chargebacks = np.array(by_kind["chargeback"])
    assert 18 < np.median(chargebacks) < 24 and chargebacks.min() >= 3 and chargebacks.max() <= 120
    assert 1.5 < np.median(by_kind["confirmed_fraud"]) < 2.5


def test_the_csv_is_what_cascade_outcomes_import_reads(tmp_path: Path) -> None:
    path = tmp_path / "outcomes.csv"
    outcomes = list(simulate_outcomes(stream(50, 500), seed=1))
    assert write_outcome_csv(path, outcomes) == len(outcomes)
    parsed = {o.transaction_id for _, o in parse_outcome_file(path.read_text(), jsonl=False)}
    assert parsed == {o.transaction_id for o in outcomes}
