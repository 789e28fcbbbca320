"""dp.noise_plan: sigma for a target epsilon by hospital size, from the same projection a DP job runs."""

from __future__ import annotations

import pytest

from splitunet.dp import DPSettings, plan_budget, project_epsilon
from splitunet.dp.noise_plan import main, noise_plan, noise_plan_markdown
from splitunet.errors import SplitUNetConfigError


def test_a_smaller_hospital_needs_more_noise_for_the_same_epsilon():
    rows = noise_plan(cases=[6, 60, 600], batch_sizes=[2], steps=400, epsilons=[3.0])
    sigmas = [row.noise_multiplier for row in rows]
    assert sigmas[0] > sigmas[1] > sigmas[2]
    assert [row.sample_rate for row in rows] == pytest.approx([1 / 3, 1 / 30, 1 / 300])


def test_a_larger_epsilon_needs_less_noise():
    rows = noise_plan(cases=[60], batch_sizes=[2], steps=400, epsilons=[1.0, 3.0, 10.0])
    sigmas = [row.noise_multiplier for row in rows]
    assert sigmas[0] > sigmas[1] > sigmas[2]


def test_each_row_is_the_jobs_own_projection_and_spends_its_target():
    (row,) = noise_plan(cases=[6], batch_sizes=[2], steps=400, epsilons=[3.0])
    budget = plan_budget(DPSettings(target_epsilon=3.0), 6, 2, 400)
    assert row.noise_multiplier == budget.noise_multiplier
    assert row.delta == budget.delta == 1e-5
    assert row.epochs == pytest.approx(400 / 3)
    assert row.noise_per_coordinate == pytest.approx(budget.noise_multiplier / 2)
    spent = project_epsilon(row.noise_multiplier, row.sample_rate, row.steps, row.delta)
    assert spent <= 3.0 and spent == pytest.approx(3.0, rel=0.01)


def test_the_default_delta_follows_each_hospitals_size_and_a_stated_one_is_kept():
    default = noise_plan(cases=[6, 100_000], batch_sizes=[2], steps=10, epsilons=[3.0])
    assert [row.delta for row in default] == [1e-5, 1e-6]
    stated = noise_plan(cases=[6, 100_000], batch_sizes=[2], steps=10, epsilons=[3.0], delta=1e-7)
    assert [row.delta for row in stated] == [1e-7, 1e-7]


def test_a_bad_size_is_refused_naming_it():
    with pytest.raises(SplitUNetConfigError, match="num_cases"):
        noise_plan(cases=[0], batch_sizes=[2], steps=10, epsilons=[3.0])


def test_the_table_has_a_line_per_row_and_the_command_prints_it(capsys):
    rows = noise_plan(cases=[6, 60], batch_sizes=[2, 3], steps=50, epsilons=[1.0])
    table = noise_plan_markdown(rows)
    assert len(table.strip().splitlines()) == 2 + len(rows) == 6
    printed = main(["--cases", "6", "60", "--batch", "2", "3", "--steps", "50", "--epsilons", "1"])
    assert capsys.readouterr().out == table
    assert [entry["noise_multiplier"] for entry in printed] == [row.noise_multiplier for row in rows]
