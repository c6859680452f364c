"""The local stack's pseudonym key: one per run dir, kept, unless the user names one; and
``cascade decisions --card`` hashing the card as the stack's orchestrators do."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from cascade.errors import ConfigurationError
from cascade.pseudonym import from_settings
from cascade.settings import PseudonymSettings
from devstack.cli import _card_tokens
from devstack.stack import PSEUDONYM_KEY_FILE, pseudonym_env


@pytest.fixture(autouse=True)
def no_key_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CASCADE_PSEUDONYM__KEY", "CASCADE_PSEUDONYM__KEY_FILE"):
        monkeypatch.delenv(name, raising=False)


def test_the_stack_makes_a_key_per_run_dir_and_keeps_it(tmp_path: Path) -> None:
    env = pseudonym_env(tmp_path / "a", {})
    path = Path(env["CASCADE_PSEUDONYM__KEY_FILE"])
    assert path == tmp_path / "a" / PSEUDONYM_KEY_FILE
    key = path.read_text()
    assert pseudonym_env(tmp_path / "a", {}) == env and path.read_text() == key
    other = Path(pseudonym_env(tmp_path / "b", {})["CASCADE_PSEUDONYM__KEY_FILE"])
    assert other.read_text() != key


def test_a_key_the_user_names_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert pseudonym_env(tmp_path, {"CASCADE_PSEUDONYM__KEY": "x" * 40}) == {}
    monkeypatch.setenv("CASCADE_PSEUDONYM__KEY_FILE", str(tmp_path / "mine"))
    assert pseudonym_env(tmp_path, {}) == {}
    assert not (tmp_path / PSEUDONYM_KEY_FILE).exists()


def test_decisions_card_filter_hashes_with_the_run_dirs_key(tmp_path: Path) -> None:
    path = Path(pseudonym_env(tmp_path, {})["CASCADE_PSEUDONYM__KEY_FILE"])
    orchestrators = from_settings(PseudonymSettings(key_file=path))
    assert _card_tokens("card-7", tmp_path) == {orchestrators.card("card-7")}
    with pytest.raises(ConfigurationError, match="no pseudonym key"):
        _card_tokens("card-7", tmp_path / "elsewhere")


def test_decisions_card_filter_matches_both_keys_while_rotating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = "o" * 40, "n" * 40
    monkeypatch.setenv("CASCADE_PSEUDONYM__KEY", new)
    monkeypatch.setenv("CASCADE_PSEUDONYM__KEY_ID", "k2")
    monkeypatch.setenv("CASCADE_PSEUDONYM__PREVIOUS_KEY", old)
    monkeypatch.setenv("CASCADE_PSEUDONYM__PREVIOUS_KEY_ID", "k1")
    before = from_settings(PseudonymSettings(key=SecretStr(old)))
    after = from_settings(PseudonymSettings(key=SecretStr(new), key_id="k2"))
    assert _card_tokens("card-7", tmp_path) == {before.card("card-7"), after.card("card-7")}
