"""batch_beside_live refuses environment it cannot apply before starting any stack."""

from __future__ import annotations

import pytest

from loadtests.batch_beside_live import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--stack-env", "NO_EQUALS_SIGN"], "--stack-env: expected KEY=VALUE"),
        (["--compare-env", "CASCADE_REDIS__URL"], "--compare-env: expected KEY=VALUE"),
    ],
)
def test_a_malformed_pair_is_refused_with_its_flag_named(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err
