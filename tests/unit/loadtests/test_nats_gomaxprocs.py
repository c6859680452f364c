"""The NATS processor benchmark's arguments."""

from __future__ import annotations

import pytest

from loadtests.nats_gomaxprocs import main


@pytest.mark.parametrize("argv", [["--n", "0"], ["--payload-bytes", "-1"]])
def test_bad_counts_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        main(argv)
