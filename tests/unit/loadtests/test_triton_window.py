"""The Triton window benchmark's pure part: nearest-rank quantiles."""

from __future__ import annotations

import pytest

from loadtests.triton_window import main, quantile


def test_quantile_is_the_nearest_rank() -> None:
    samples = [float(i) for i in range(1, 101)]
    assert quantile(samples, 0.5) == 51.0
    assert quantile(samples, 0.99) == 100.0
    assert quantile([3.0], 0.99) == 3.0
    with pytest.raises(ValueError, match="no samples"):
        quantile([], 0.5)


def test_a_window_of_zero_is_refused() -> None:
    with pytest.raises(SystemExit):
        main(["--window-us", "0"])
