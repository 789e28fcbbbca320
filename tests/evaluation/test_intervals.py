"""Student's t intervals and which side of zero they lie on."""

import pytest

from splitunet.evaluation.intervals import interval_sign, t_interval


def test_the_interval_uses_students_quantile_for_few_values():
    interval = t_interval([1.0, 2.0, 3.0])
    assert interval["mean"] == pytest.approx(2.0) and interval["n"] == 3
    assert interval["high"] - interval["mean"] == pytest.approx(4.303 * 1.0 / 3**0.5, rel=1e-3)


@pytest.mark.parametrize(
    "values, side",
    [([0.1, 0.12, 0.11], 1), ([-0.1, -0.12, -0.11], -1), ([-0.1, 0.1, 0.02], 0), ([0.5], None), ([], None)],
)
def test_the_sign_reads_the_whole_interval_not_the_mean(values, side):
    assert interval_sign(t_interval(values)) == side
