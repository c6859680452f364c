"""The orchestrator's Python profile, divided by the answers given while it ran."""

from __future__ import annotations

import cProfile
import gc
import json
import pstats
from pathlib import Path

import pytest

from loadtests.server_profile import _Window, per_answer, summary


def _helper() -> int:
    return sum(range(10))


def result_to_proto() -> int:  # named as the one call each answer makes
    return _helper() + _helper() + _helper()


def _profile(answers: int) -> pstats.Stats:
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(answers):
        result_to_proto()
    profile.disable()
    return pstats.Stats(profile)


def test_calls_are_counted_per_answer() -> None:
    figures = per_answer(_profile(10))

    assert figures.answers == 10
    helper = next(f for f in figures.functions if f.name.endswith(" _helper"))
    assert helper.calls == 3.0
    assert helper.own_us > 0 and helper.inclusive_us >= helper.own_us
    # each answer: result_to_proto, three _helper calls and their three sum() calls
    assert figures.calls >= 7.0
    assert any(m.name == "built-in method builtins.sum" for m in figures.modules)
    assert figures.functions == sorted(figures.functions, key=lambda f: -f.own_us)


def test_a_profile_without_answers_is_refused() -> None:
    profile = cProfile.Profile()
    profile.enable()
    _helper()
    profile.disable()
    with pytest.raises(ValueError, match="no call of result_to_proto"):
        per_answer(pstats.Stats(profile))


def test_a_window_profiles_once_and_writes_its_collections(tmp_path: Path) -> None:
    window = _Window(tmp_path / "run")
    gc.callbacks.append(window.on_gc)
    gc.disable()  # only the collections below
    try:
        assert window.start()
        assert not window.start()  # already open
        for _ in range(5):
            result_to_proto()
        gc.collect(0)
        window.stop()
        gc.collect(0)  # after the window: not recorded
    finally:
        gc.enable()
        gc.callbacks.remove(window.on_gc)

    assert not window.start()  # a profile covers one window
    pauses = json.loads((tmp_path / "run.gc.json").read_text())["pauses"]
    assert [generation for generation, _ in pauses] == [0]
    text = summary(tmp_path / "run")
    assert text.startswith("5 answers: ")
    assert "gc generation 0: " in text


def test_a_window_without_answers_is_written_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    window = _Window(tmp_path / "idle")
    window.start()
    _helper()
    window.stop()  # from a signal handler in the server: it must not raise

    assert (tmp_path / "idle.prof").exists()
    assert "no summary: no call of result_to_proto" in capsys.readouterr().out
