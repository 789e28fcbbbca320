"""server.cohorts: several sites per modality hold different patients; cases group by the sites holding them, each
cohort holds out its own cases, and each step draws one cohort, seeded and resumable. With one site per modality the
run is the run without cohorts."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from splitunet.data.sampling import RandomCropPlanner
from splitunet.errors import SplitUNetConfigError, SplitUNetDataError
from splitunet.server.cases import match_cases, split_cases
from splitunet.server.cohorts import CohortPlanner, group_party, match_cohorts
from splitunet.server.decoder_inputs import modality_groups

SHAPE = [40, 40, 40]


def _cases(keys, digest="grid") -> dict:
    return {key: {"shape": SHAPE, "affine_digest": digest} for key in keys}


# Two sites per modality: site-a* hold patients k0..k5, site-b* hold k6..k9; the label holder has k0..k10.
SITE_MODALITY = {"a-flair": "flair", "a-t1": "t1", "b-flair": "flair", "b-t1": "t1"}
SITE_KEYS = {
    "a-flair": [f"k{i}" for i in range(6)],
    "a-t1": [f"k{i}" for i in range(6)],
    "b-flair": [f"k{i}" for i in range(6, 10)],
    "b-t1": [f"k{i}" for i in range(6, 10)],
}
LABELS = _cases(f"k{i}" for i in range(11))


def _match(site_keys=SITE_KEYS, site_modality=SITE_MODALITY, labels=LABELS):
    site_cases = {site: _cases(keys) for site, keys in site_keys.items()}
    return match_cohorts("server", labels, site_cases, modality_groups(site_modality)), site_cases


def _split(match, site_cases, site_modality=SITE_MODALITY, num_val_cases=2, seed=0):
    return match.split(
        LABELS, site_cases, site_modality, lambda key: f"case-{key}", lambda case: case, num_val_cases, seed
    )


def test_cases_group_by_the_sites_that_hold_them_and_each_cohort_holds_out_its_own():
    match, site_cases = _match()
    assert list(match.keys_by_sites) == [("a-flair", "a-t1"), ("b-flair", "b-t1")]
    # k10 has a label but no site holds it: left out, counted for every modality's pair of sites.
    assert match.matched.left_out == {"a-flair+b-flair": 1, "a-t1+b-t1": 1}
    assert match.party_modality == {"a-flair+b-flair": "flair", "a-t1+b-t1": "t1"}
    first, second = _split(match, site_cases)
    assert (len(first.train_keys), len(first.val_keys), len(second.train_keys), len(second.val_keys)) == (4, 2, 2, 2)
    assert set(first.keys) == set(SITE_KEYS["a-flair"]) and set(second.keys) == set(SITE_KEYS["b-flair"])
    assert first.describe(SITE_MODALITY, steps=3) == {
        "sites": {"a-flair": "flair", "a-t1": "t1"},
        "train_cases": 4,
        "val_cases": 2,
        "steps": 3,
    }


def test_cohorts_need_not_line_up_across_modalities():
    # The t1 sites split the patients differently: four cohorts, each a pair that holds some cases together.
    site_keys = {**SITE_KEYS, "a-t1": ["k0", "k1", "k2", "k6", "k7"], "b-t1": ["k3", "k4", "k5", "k8", "k9"]}
    match, _ = _match(site_keys)
    assert match.keys_by_sites == {
        ("a-flair", "a-t1"): ["k0", "k1", "k2"],
        ("a-flair", "b-t1"): ["k3", "k4", "k5"],
        ("b-flair", "a-t1"): ["k6", "k7"],
        ("b-flair", "b-t1"): ["k8", "k9"],
    }


def test_with_one_site_per_modality_there_is_one_cohort_split_as_without_cohorts():
    site_modality = {"site-1": "flair", "site-2": "t1"}
    site_keys = {"site-1": [f"k{i}" for i in range(9)], "site-2": [f"k{i}" for i in range(1, 10)]}
    match, site_cases = _match(site_keys, site_modality)
    [cohort] = _split(match, site_cases, site_modality, num_val_cases=3, seed=5)
    common = [f"k{i}" for i in range(1, 9)]
    assert cohort.sites == ("site-1", "site-2")
    assert (list(cohort.train_keys), list(cohort.val_keys)) == split_cases(common, 3, 5)
    # Left-out cases counted and named as before: by the site alone.
    assert match.matched == match_cases({"server": LABELS, **site_cases})
    assert match.matched.left_out == {"site-1": 2, "site-2": 2} and group_party(["site-1"]) == "site-1"


def test_two_sites_of_one_modality_holding_one_patient_are_refused_by_key():
    site_keys = {**SITE_KEYS, "b-flair": ["k5", *SITE_KEYS["b-flair"]]}
    with pytest.raises(SplitUNetDataError, match=r"case key=k5\] sites a-flair and b-flair both hold this case"):
        _match(site_keys)


def test_a_misaligned_volume_is_named_by_its_own_site():
    match, site_cases = _match()
    site_cases["b-t1"]["k7"] = {"shape": SHAPE, "affine_digest": "other"}
    with pytest.raises(SplitUNetDataError, match=r"party=b-t1, case=case-k7, case key=k7.*t1 volume"):
        _split(match, site_cases)


def test_cohorts_too_small_to_hold_out_a_case_are_refused():
    site_keys = {"a-flair": ["k0"], "a-t1": ["k0"], "b-flair": ["k1"], "b-t1": ["k1"]}
    match, site_cases = _match(site_keys)
    with pytest.raises(SplitUNetConfigError, match=r"no cohort holds two cases \(cohorts of \[1, 1\] cases\)"):
        _split(match, site_cases)


# --- drawing a cohort per step ---

COHORT_SHAPES = [{f"a{i}": SHAPE for i in range(30)}, {f"b{i}": SHAPE for i in range(10)}]


def test_one_cohort_plans_exactly_as_one_crop_planner():
    planner = CohortPlanner(COHORT_SHAPES[:1], (32, 32, 32), 2, seed=4)
    reference = RandomCropPlanner(COHORT_SHAPES[0], (32, 32, 32), 2, seed=4)
    for _ in range(20):
        assert planner.next_plan() == (0, reference.next_plan())


def test_a_step_draws_its_whole_batch_from_one_cohort_in_proportion_to_its_cases():
    planner = CohortPlanner(COHORT_SHAPES, (32, 32, 32), 3, seed=1)
    draws = [planner.next_plan() for _ in range(2000)]
    for index, plan in draws:
        assert {key[0] for key in plan["keys"]} == {"ab"[index]}
    share = Counter(index for index, _ in draws)[0] / len(draws)
    assert 0.72 < share < 0.78  # 30 of 40 training cases
    assert planner.steps == [Counter(i for i, _ in draws)[0], Counter(i for i, _ in draws)[1]]


def test_round_robin_takes_turns_and_a_cohort_without_sites_is_skipped():
    planner = CohortPlanner(COHORT_SHAPES, (32, 32, 32), 1, seed=1, draw="round_robin")
    assert [planner.next_plan()[0] for _ in range(5)] == [0, 1, 0, 1, 0]
    assert {planner.next_plan([True, False])[0] for _ in range(5)} == {0}
    proportional = CohortPlanner(COHORT_SHAPES, (32, 32, 32), 1, seed=1)
    assert {proportional.next_plan([False, True])[0] for _ in range(50)} == {1}
    with pytest.raises(ValueError, match="no cohort is available"):
        proportional.next_plan([False, False])


@pytest.mark.parametrize("draw", ["proportional", "round_robin"])
def test_a_resumed_planner_draws_the_same_cohorts_and_crops(draw):
    planner = CohortPlanner(COHORT_SHAPES, (32, 32, 32), 2, seed=9, draw=draw)
    for _ in range(7):
        planner.next_plan()
    resumed = CohortPlanner(COHORT_SHAPES, (32, 32, 32), 2, seed=9, draw=draw)
    resumed.load_state_dict(planner.state_dict())
    assert resumed.steps == planner.steps
    assert [resumed.next_plan() for _ in range(12)] == [planner.next_plan() for _ in range(12)]
    other = CohortPlanner(COHORT_SHAPES[:1], (32, 32, 32), 2, seed=9, draw=draw)
    with pytest.raises(ValueError, match="cannot resume sampling"):
        other.load_state_dict(planner.state_dict())


def test_a_checkpoint_of_a_single_crop_planner_resumes_one_cohort():
    reference = RandomCropPlanner(COHORT_SHAPES[0], (32, 32, 32), 2, seed=4)
    for _ in range(3):
        reference.next_plan()
    planner = CohortPlanner(COHORT_SHAPES[:1], (32, 32, 32), 2, seed=4)
    planner.load_state_dict(reference.state_dict())
    assert [plan for _, plan in itertools.islice(iter(planner.next_plan, None), 4)] == [
        reference.next_plan() for _ in range(4)
    ]
