"""Unit tests for the rollout: the canary split, the multi-version registry (validation,
promote, rollback, atomic write) and the report's arithmetic."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest

from cascade.canary import card_bucket, in_canary
from cascade.model_registry import (
    RegistryError,
    load_registry,
    promoted,
    rolled_back,
    write_registry,
)
from cascade.registry_watch import RegistryWatch
from devstack.rollout_cli import add_arguments as add_rollout_arguments
from devstack.rollout_cli import run as run_rollout
from devstack.rollout_report import build_report, pearson, quantile
from tests.unit.test_model_registry import write_model_dir

# --- the canary split ----------------------------------------------------------------------------


@pytest.mark.parametrize("share", [0.01, 0.05, 0.2, 0.5])
def test_canary_share_is_close_to_its_setting(share: float) -> None:
    cards = [f"card-{i:06d}" for i in range(20_000)]
    measured = sum(in_canary(c, share) for c in cards) / len(cards)
    sd = math.sqrt(share * (1 - share) / len(cards))
    assert abs(measured - share) < 4 * sd


def test_canary_is_sticky_and_a_larger_share_only_adds_cards() -> None:
    cards = [f"c{i}" for i in range(5000)]
    small = {c for c in cards if in_canary(c, 0.05)}
    assert small == {c for c in cards if in_canary(c, 0.05)}  # same card, same side
    large = {c for c in cards if in_canary(c, 0.2)}
    assert small < large
    assert not any(in_canary(c, 0.0) for c in cards)
    assert all(in_canary(c, 1.0) for c in cards)


def test_card_bucket_is_a_stable_hash_not_pythons_salted_one() -> None:
    # a fixed value: another process (or another Python) must put the card in the same place
    digest = hashlib.blake2b(b"card-42", digest_size=8).digest()
    assert card_bucket("card-42") == int.from_bytes(digest, "big") / 2**64
    assert 0.0 <= card_bucket("") < 1.0


# --- the registry --------------------------------------------------------------------------------


def with_candidate(root: Path, **candidate: Any) -> dict[str, Any]:
    (root / "screening/s1-10").mkdir(parents=True, exist_ok=True)
    (root / "screening/s1-10/model.onnx").write_bytes(b"stage one, again")
    (root / "heavy/s2-10").mkdir(parents=True, exist_ok=True)
    (root / "heavy/s2-10/model.onnx").write_bytes(b"stage two, again")
    stage1 = {
        "version": "s1-10",
        "path": "screening/s1-10/model.onnx",
        "sha256": hashlib.sha256(b"stage one, again").hexdigest(),
    }
    stage2 = {
        "version": "s2-10",
        "triton_model": "fraud_heavy",
        "triton_version": 4,
        "path": "heavy/s2-10/model.onnx",
        "sha256": hashlib.sha256(b"stage two, again").hexdigest(),
    }
    doc = {"stage1": stage1, "stage2": stage2}
    doc.update(candidate)
    return {k: v for k, v in doc.items() if v is not None}


def test_todays_registry_loads_unchanged() -> None:
    registry = load_registry(Path("models"))
    assert registry.candidate is None and registry.previous is None
    assert registry.candidate_set() is None
    assert (
        registry.champion().stage1.version
        == json.loads(Path("models/registry.json").read_text())["stage1"]["version"]
    )


def test_a_candidate_completes_with_the_champions_parts(tmp_path: Path) -> None:
    write_model_dir(tmp_path)
    write_model_dir_candidate = with_candidate(tmp_path, stage1=None)
    doc = json.loads((tmp_path / "registry.json").read_text())
    doc["candidate"] = write_model_dir_candidate
    (tmp_path / "registry.json").write_text(json.dumps(doc))
    registry = load_registry(tmp_path)
    candidate = registry.candidate_set()
    assert candidate is not None
    assert (candidate.stage1.version, candidate.stage2.version) == ("s1-9", "s2-10")
    assert candidate.policy_path == registry.champion().policy_path
    assert [a.triton_version for a in registry.stage2_artifacts()] == [3, 4]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({}, "at least one of stage1, stage2, policy"),
        ({"stage1": {"version": "s1-9"}}, "is the champion's"),
        ({"stage2": {"version": "s2-9"}}, "is the champion's"),
        ({"stage2": {"triton_version": 3}}, "give it another triton_version"),
        ({"stage2": {"triton_version": None}}, "must name triton_model and triton_version"),
        ({"stage1": {"sha256": "0" * 64}}, "registry says"),
        ({"policy": "policies/policy-9.json"}, "is the champion's policy file"),
        ({"unknown": 1}, "Extra inputs are not permitted"),
    ],
)
def test_a_bad_candidate_is_refused_naming_the_problem(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    write_model_dir(tmp_path)
    candidate = with_candidate(tmp_path)
    if change:
        for key, value in change.items():
            if isinstance(value, dict):
                candidate[key] = {**candidate[key], **value}
                candidate[key] = {k: v for k, v in candidate[key].items() if v is not None}
            else:
                candidate = {key: value}
    else:
        candidate = {}
    doc = json.loads((tmp_path / "registry.json").read_text())
    doc["candidate"] = candidate
    (tmp_path / "registry.json").write_text(json.dumps(doc))
    with pytest.raises(RegistryError, match=message):
        load_registry(tmp_path)


def test_a_candidate_policy_needs_a_version_of_its_own(tmp_path: Path) -> None:
    write_model_dir(tmp_path)
    policy = json.loads((tmp_path / "policies/policy-9.json").read_text())
    (tmp_path / "policies/policy-9-copy.json").write_text(json.dumps(policy))
    doc = json.loads((tmp_path / "registry.json").read_text())
    doc["candidate"] = {"policy": "policies/policy-9-copy.json"}
    (tmp_path / "registry.json").write_text(json.dumps(doc))
    with pytest.raises(RegistryError, match="has the champion's version 'policy-9'"):
        load_registry(tmp_path)


def test_promote_then_rollback_round_trips_through_the_file(tmp_path: Path) -> None:
    write_model_dir(tmp_path)
    doc = json.loads((tmp_path / "registry.json").read_text())
    doc["candidate"] = with_candidate(tmp_path)
    (tmp_path / "registry.json").write_text(json.dumps(doc))
    original = load_registry(tmp_path)

    after = promoted(original)
    assert (after.stage1.version, after.stage2.version) == ("s1-10", "s2-10")
    assert after.candidate is None
    assert after.previous is not None and after.previous.stage1.version == "s1-9"
    write_registry(tmp_path, after)
    assert load_registry(tmp_path).stage1.version == "s1-10"
    assert not list(tmp_path.glob(".registry-*"))  # no temporary file left behind

    back = rolled_back(load_registry(tmp_path))
    assert (back.stage1.version, back.stage2.version) == ("s1-9", "s2-9")
    assert back.previous is None and back.candidate is None
    with pytest.raises(RegistryError, match="neither a candidate nor a previous"):
        rolled_back(back)
    with pytest.raises(RegistryError, match="no candidate to promote"):
        promoted(back)


def test_the_registry_share_overrides_the_setting_and_the_command_changes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_model_dir(tmp_path)
    assert load_registry(tmp_path).canary_share(0.3) == 0.0  # no candidate: no canary
    doc = json.loads((tmp_path / "registry.json").read_text())
    doc["candidate"] = with_candidate(tmp_path)
    (tmp_path / "registry.json").write_text(json.dumps(doc))
    assert load_registry(tmp_path).canary_share(0.3) == 0.3  # none in the file: the setting

    parser = argparse.ArgumentParser()
    add_rollout_arguments(parser.add_subparsers(dest="command"))

    def share(value: str) -> tuple[int, str, str]:
        args = parser.parse_args(["rollout", "share", value, "--model-dir", str(tmp_path)])
        code = run_rollout(args)
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = share("0.25")
    assert code == 0 and "share 25.0% of cards" in out
    assert load_registry(tmp_path).canary_share(0.3) == 0.25
    code, _, err = share("1.5")  # refused, the file unchanged
    assert code == 2 and "canary_share" in err
    assert load_registry(tmp_path).canary_share(0.3) == 0.25
    code, out, _ = share("0")
    assert code == 0 and "share 0.0% of cards" in out
    assert load_registry(tmp_path).canary_share(0.3) == 0.0  # 0 in the file: shadow only


def test_rollback_during_a_canary_drops_the_candidate(tmp_path: Path) -> None:
    write_model_dir(tmp_path)
    doc = json.loads((tmp_path / "registry.json").read_text())
    doc["candidate"] = with_candidate(tmp_path)
    (tmp_path / "registry.json").write_text(json.dumps(doc))
    back = rolled_back(load_registry(tmp_path))
    assert back.candidate is None
    assert back.stage1.version == "s1-9"


def test_the_watch_sees_a_replaced_registry_once(tmp_path: Path) -> None:
    write_model_dir(tmp_path)
    watch = RegistryWatch(tmp_path)
    assert not watch.changed()
    write_registry(tmp_path, load_registry(tmp_path))  # same content, new inode
    assert watch.changed()
    assert not watch.changed()
    (tmp_path / "registry.json").unlink()
    assert not watch.changed()  # a missing file keeps what serves


# --- the report ----------------------------------------------------------------------------------


def row(
    tx: str, champ: str, cand: str, s_champ: float, s_cand: float, **extra: Any
) -> dict[str, Any]:
    return {
        "transaction_id": tx,
        "champion_versions": "p/a/b/fs",
        "candidate_versions": "p/c/b/fs",
        "champion_decision": champ,
        "candidate_decision": cand,
        "champion_score": s_champ,
        "candidate_score": s_cand,
        "champion_stage1_score": s_champ,
        "candidate_stage1_score": s_cand,
        "champion_escalated": extra.get("esc", False),
        "candidate_escalated": extra.get("cesc", False),
        "candidate_latency_us": extra.get("lat", 100.0),
    }


def test_report_confusion_agreement_and_diffs() -> None:
    rows = [
        row("t1", "APPROVE", "APPROVE", 0.1, 0.1),
        row("t2", "APPROVE", "REVIEW", 0.2, 0.6, cesc=True),
        row("t3", "DECLINE", "DECLINE", 0.9, 0.95, esc=True, cesc=True, lat=300.0),
        row("t4", "REVIEW", "APPROVE", 0.6, 0.3),
    ]
    report = build_report(rows)
    assert report.rows == 4
    assert report.agreement == pytest.approx(0.5)
    assert report.confusion["APPROVE"] == {"APPROVE": 1, "REVIEW": 1, "DECLINE": 0}
    assert report.confusion["REVIEW"]["APPROVE"] == 1
    assert report.confusion["DECLINE"]["DECLINE"] == 1
    assert report.max_abs_diff == pytest.approx(0.4)
    assert report.mean_abs_diff == pytest.approx((0 + 0.4 + 0.05 + 0.3) / 4)
    assert report.champion_escalated == pytest.approx(0.25)
    assert report.candidate_escalated == pytest.approx(0.5)
    assert report.candidate_latency_p99_us == 300.0
    assert report.champion_quality is None


def test_report_quality_uses_only_labelled_rows() -> None:
    rows = [
        row("t1", "DECLINE", "DECLINE", 0.9, 0.9),
        row("t2", "REVIEW", "DECLINE", 0.6, 0.9),
        row("t3", "APPROVE", "APPROVE", 0.1, 0.1),
        row("t4", "APPROVE", "REVIEW", 0.1, 0.6),
        row("t5", "APPROVE", "APPROVE", 0.1, 0.1),  # no label
    ]
    labels = {"t1": True, "t2": True, "t3": False, "t4": True}
    report = build_report(rows, labels)
    champ, cand = report.champion_quality, report.candidate_quality
    assert champ is not None and cand is not None
    assert (champ.labelled, champ.frauds) == (4, 3)
    assert champ.decline_precision == 1.0 and champ.decline_recall == pytest.approx(1 / 3)
    assert champ.flag_recall == pytest.approx(2 / 3)
    assert cand.decline_recall == pytest.approx(2 / 3)
    assert cand.flag_recall == 1.0 and cand.flag_precision == 1.0


def test_pearson_and_quantile() -> None:
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 1], [1, 2]) is None
    assert pearson([1], [1]) is None
    assert quantile([], 0.5) is None
    assert quantile([5, 1, 3], 0.5) == 3
    assert quantile(list(range(1, 101)), 0.99) == 99
