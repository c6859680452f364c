"""The Triton window benchmark's arguments."""

from __future__ import annotations

import pytest

from loadtests.triton_window import main


@pytest.mark.parametrize("argv", [["--window-us", "0"], ["--n", "0"]])
def test_a_window_or_count_of_zero_is_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        main(argv)
