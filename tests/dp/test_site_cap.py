"""dp.site_cap: a site's max_epsilon in its privacy.json refuses, before training, a job whose projected epsilon
exceeds it (at the site's delta) or that trains without DP-SGD, naming the cap and the projection."""

from __future__ import annotations

import json
import re

import pytest

from splitunet.dp import DPSettings, EpsilonCap, EpsilonCapExceeded, check_epsilon_cap, plan_budget, read_epsilon_cap
from splitunet.errors import SplitUNetConfigError


@pytest.fixture(scope="module")
def budget():
    # 40 cases in batches of 4 (q = 0.1), 50 steps at sigma 1.0: epsilon about 3 at delta 1e-5.
    return plan_budget(DPSettings(noise_multiplier=1.0), num_cases=40, batch_size=4, steps=50)


def _policy(tmp_path, content) -> object:
    path = tmp_path / "privacy.json"
    path.write_text(json.dumps({"format_version": 2, "scopes": [], **content}))
    return path


def test_a_job_within_the_cap_passes_and_says_what_was_checked(budget):
    line = check_epsilon_cap(EpsilonCap(budget.epsilon + 0.01), budget, "hospital-1")
    assert line.startswith(f"projected epsilon {budget.epsilon:.4g} at delta 1e-05") and "within the cap" in line
    assert check_epsilon_cap(None, budget, "hospital-1") is None
    assert check_epsilon_cap(None, None, "hospital-1") is None


def test_a_job_above_the_cap_is_refused_naming_the_cap_and_the_projection(budget):
    cap = EpsilonCap(budget.epsilon * 0.9)
    with pytest.raises(EpsilonCapExceeded) as refused:
        check_epsilon_cap(cap, budget, "hospital-1")
    message = str(refused.value)
    assert message.startswith("site hospital-1 refuses this job: its projected epsilon")
    assert f"{budget.epsilon:.4g} at delta 1e-05" in message
    assert f"exceeds the site's cap max_epsilon {cap.max_epsilon:g}" in message
    assert "sigma 1, sample rate 0.1, 50 steps, rdp accountant" in message


def test_the_cap_is_judged_at_the_sites_delta(budget):
    # Under the cap at the job's delta, above it at the site's stricter one.
    stricter = budget.epsilon_at(1e-9)
    assert stricter > budget.epsilon
    cap = EpsilonCap((budget.epsilon + stricter) / 2, delta=1e-9)
    with pytest.raises(EpsilonCapExceeded, match=re.escape(f"{stricter:.4g} at delta 1e-09")):
        check_epsilon_cap(cap, budget, "hospital-1")


def test_a_job_without_dp_is_refused_by_a_site_with_a_cap():
    with pytest.raises(
        EpsilonCapExceeded, match=r"hospital-2 refuses this job: .* without DP-SGD.*unbounded \(inf\).*max_epsilon 8"
    ):
        check_epsilon_cap(EpsilonCap(8), None, "hospital-2")


def test_the_cap_is_read_from_the_sites_privacy_json(tmp_path):
    assert read_epsilon_cap(tmp_path / "privacy.json") is None
    assert read_epsilon_cap(_policy(tmp_path, {})) is None
    cap = read_epsilon_cap(_policy(tmp_path, {"splitunet_epsilon_cap": {"max_epsilon": 6, "delta": 1e-6}}))
    assert (cap.max_epsilon, cap.delta) == (6, 1e-6) and "privacy.json" in cap.source


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"delta": 1e-5}, "must be"),
        ({"max_epsilon": 8, "epsilon": 1}, "must be"),
        ({"max_epsilon": 0}, "max_epsilon must be a finite number > 0"),
        ({"max_epsilon": "8"}, "max_epsilon must be a finite number > 0"),
        ({"max_epsilon": 8, "delta": 2}, r"delta must be a number in \(0, 1\)"),
    ],
)
def test_a_malformed_cap_is_refused_naming_the_file(tmp_path, entry, message):
    with pytest.raises(SplitUNetConfigError, match=f"local/privacy.json splitunet_epsilon_cap.*{message}"):
        read_epsilon_cap(_policy(tmp_path, {"splitunet_epsilon_cap": entry}))
