"""SiteRoster: dropped sites stay out, modality dropout keeps at least one site, and resumes the same draws."""

from __future__ import annotations

import pytest

from splitunet.server.site_roster import SiteRoster

SITES = ["site-1", "site-2", "site-3", "site-4"]
MODALITY_OF = dict(zip(SITES, ["flair", "t1", "t1gd", "t2"]))


def test_without_dropout_every_active_site_takes_part():
    roster = SiteRoster(SITES, MODALITY_OF)
    assert roster.step_participants() == SITES
    record = roster.drop("site-2", 7, "silent")
    assert record == {"site": "site-2", "modality": "t1", "iteration": 7, "reason": "silent"}
    assert roster.active == ["site-1", "site-3", "site-4"] == roster.step_participants()
    with pytest.raises(ValueError, match="not taking part"):
        roster.drop("site-2", 8, "again")


def test_dropout_leaves_sites_out_at_its_rate_and_never_all():
    roster = SiteRoster(SITES, MODALITY_OF, modality_dropout=0.5, seed=3)
    draws = [roster.step_participants() for _ in range(2000)]
    assert all(draws) and all(set(d) <= set(SITES) for d in draws)
    rate = 1 - sum(len(d) for d in draws) / (len(SITES) * len(draws))
    # 0.5 minus the rescued all-out draws (1/16 of steps give one site back): about 0.47.
    assert 0.43 < rate < 0.50
    assert {len(d) for d in draws} == {1, 2, 3, 4}


def test_dropout_draws_continue_after_a_reload():
    roster = SiteRoster(SITES, MODALITY_OF, modality_dropout=0.3, seed=1)
    for _ in range(5):
        roster.step_participants()
    roster.drop("site-4", 5, "failed")
    state = roster.state_dict()
    expected = [roster.step_participants() for _ in range(20)]
    other = SiteRoster(SITES, MODALITY_OF, modality_dropout=0.3, seed=99)
    other.load_state_dict(state)
    assert other.active == ["site-1", "site-2", "site-3"]
    assert [other.step_participants() for _ in range(20)] == expected


def test_invalid_rosters():
    with pytest.raises(ValueError, match="at least one site"):
        SiteRoster([], {})
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        SiteRoster(SITES, MODALITY_OF, modality_dropout=1.0)
    roster = SiteRoster(SITES[:2], MODALITY_OF)
    with pytest.raises(ValueError, match="site-9"):
        roster.load_state_dict({"dropped": [{"site": "site-9"}], "bit_generator": {}})


def test_a_step_draws_only_among_its_cohorts_active_sites():
    roster = SiteRoster(SITES, MODALITY_OF)
    assert roster.step_participants(among=["site-3", "site-1"]) == ["site-1", "site-3"]
    roster.drop("site-3", 2, "silent")
    assert roster.step_participants(among=["site-3", "site-1"]) == ["site-1"]
    assert roster.step_participants(among=["site-3"]) == []
    dropout = SiteRoster(SITES, MODALITY_OF, modality_dropout=0.5, seed=3)
    draws = [dropout.step_participants(among=["site-2", "site-4"]) for _ in range(200)]
    assert all(draws) and set().union(*draws) == {"site-2", "site-4"}
