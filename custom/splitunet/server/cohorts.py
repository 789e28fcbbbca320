"""Cohorts: with several sites per modality, which sites hold each case together, and which cohort each step uses.

Sites that share a modality hold different patients. A case is then held by one site of each modality, and the
set of those sites is the case's *cohort*: only they can encode its crops, so a training step draws its whole batch
from one cohort (:class:`CohortPlanner`) and only that cohort's sites compute it. The decoder has one input per
modality, so the features of any cohort go through the same decoder (docs/topologies.md, "Several sites per
modality"). With one site per modality there is one cohort, every case is in it, and the run is exactly the run
without cohorts: same held-out cases, same crop plans.

Everything here works on case keys; no case ID reaches this module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from splitunet.data.sampling import RandomCropPlanner
from splitunet.errors import SplitUNetConfigError, SplitUNetDataError
from splitunet.server import cases

__all__ = [
    "COHORT_DRAWS",
    "Cohort",
    "CohortMatch",
    "group_party",
    "merge_modality_cases",
    "match_cohorts",
    "CohortPlanner",
]

# How a step picks its cohort: in proportion to the cohorts' training cases, or in turn.
COHORT_DRAWS = ("proportional", "round_robin")
# Offsets of the cohort generators from the crop planner's seed (cohort 0's planner uses the seed itself, so one
# cohort plans exactly as a run without cohorts) and from the modality-dropout generator's offset (7919).
_PLANNER_SEED_STRIDE = 1_000_003
_DRAW_SEED_OFFSET = 104_729


@dataclass(frozen=True)
class Cohort:
    """The sites that hold a set of cases together, one per modality, and those cases split for training.

    Attributes:
        sites: one site per modality, in decoder order.
        train_keys: the cases it trains on, sorted.
        val_keys: its held-out cases, sorted.
    """

    sites: tuple[str, ...]
    train_keys: tuple[str, ...]
    val_keys: tuple[str, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        """Every case of the cohort, training ones first."""
        return self.train_keys + self.val_keys

    def describe(self, modality_of: Mapping[str, str], steps: int) -> dict:
        """What ``results.json`` keeps of the cohort: its sites by modality and counts, never a case key or ID."""
        return {
            "sites": {site: modality_of[site] for site in self.sites},
            "train_cases": len(self.train_keys),
            "val_cases": len(self.val_keys),
            "steps": int(steps),
        }


def group_party(sites: Sequence[str]) -> str:
    """How messages and ``left_out_cases`` name the sites of one modality: the site alone, else ``a+b``."""
    return "+".join(sites)


def merge_modality_cases(
    groups: Mapping[str, Sequence[str]], site_cases: Mapping[str, Mapping[str, Mapping]]
) -> tuple[dict[str, dict[str, Mapping]], dict[tuple[str, str], str]]:
    """Pool the cases of the sites of each modality, checking that no two of them hold the same case.

    Args:
        groups: modality -> its sites (:func:`~splitunet.server.decoder_inputs.modality_groups`).
        site_cases: site -> its keyed cases.

    Returns:
        ``(cases by group party, holder)``: per :func:`group_party` of each modality, every case its sites hold;
        per ``(modality, case key)``, the site that holds it.

    Raises:
        SplitUNetDataError: two sites of one modality hold the same case (named by key).
    """
    pooled: dict[str, dict[str, Mapping]] = {}
    holder: dict[tuple[str, str], str] = {}
    for modality, sites in groups.items():
        party = group_party(sites)
        pooled[party] = {}
        for site in sites:
            for key, description in site_cases[site].items():
                other = holder.get((modality, key))
                if other is not None:
                    raise SplitUNetDataError(
                        f"sites {other} and {site} both hold this case of modality {modality}; sites that share a "
                        "modality must hold different patients",
                        party=site,
                        case_key=key,
                    )
                holder[(modality, key)] = site
                pooled[party][key] = description
    return pooled, holder


@dataclass
class CohortMatch:
    """The label holder's cases matched against every modality, grouped by the sites that hold them.

    Attributes:
        matched: the match of the label holder against each modality's sites together (``left_out`` counts and
            notes; a modality's sites are one party, named by :func:`group_party`).
        party_modality: party name of :attr:`matched` -> modality.
        keys_by_sites: per cohort (its sites, one per modality in decoder order), its case keys, sorted; cohorts in
            the order of their site tuples.
    """

    matched: cases.MatchedCases
    party_modality: dict[str, str]
    keys_by_sites: dict[tuple[str, ...], list[str]]

    def split(
        self,
        label_cases: Mapping[str, Mapping],
        site_cases: Mapping[str, Mapping[str, Mapping]],
        modality_of: Mapping[str, str],
        case_name: Callable[[str], str],
        label_file: Callable[[str], str | Path],
        num_val_cases: int,
        seed: int,
    ) -> list[Cohort]:
        """Check the cohorts' cases against their labels and hold out cases per cohort.

        Each cohort holds out ``num_val_cases`` of its own cases (fewer when it has fewer than
        ``num_val_cases + 1``: every cohort keeps at least one to train on), by
        :func:`~splitunet.server.cases.split_cases` with the run's seed. With one cohort this is exactly the split
        of a run without cohorts.

        Args:
            label_cases: the label holder's keyed cases.
            site_cases: site -> its keyed cases.
            modality_of: site -> modality.
            case_name: key -> case ID (the label holder's).
            label_file: case ID -> its label file (named in alignment errors).
            num_val_cases: held-out cases per cohort.
            seed: seed of the held-out split.

        Raises:
            SplitUNetConfigError: fewer than two cases are usable, or no cohort has a case to hold out.
            SplitUNetDataError: a site's volume is not on its label's grid.
        """
        if len(self.matched.common) < 2:
            raise SplitUNetConfigError(
                f"only {len(self.matched.common)} cases are present at every party; need at least 2"
            )
        cohorts = []
        for sites, keys in self.keys_by_sites.items():
            cases.check_aligned_with_labels(
                keys, label_cases, {site: site_cases[site] for site in sites}, modality_of, case_name, label_file
            )
            train, val = cases.split_cases(keys, num_val_cases, seed)
            cohorts.append(Cohort(sites=sites, train_keys=tuple(train), val_keys=tuple(val)))
        if not any(cohort.val_keys for cohort in cohorts):
            sizes = [len(keys) for keys in self.keys_by_sites.values()]
            raise SplitUNetConfigError(
                f"no cohort holds two cases (cohorts of {sizes} cases), so none can be held out for validation"
            )
        return cohorts


def match_cohorts(
    server: str,
    label_cases: Mapping[str, Mapping],
    site_cases: Mapping[str, Mapping[str, Mapping]],
    groups: Mapping[str, Sequence[str]],
) -> CohortMatch:
    """Match the label holder's cases against every modality and group them by the sites that hold them.

    A case is used when it has a label and some site of every modality holds it; the others are left out (the
    match's ``missing``), as in a run with one site per modality.

    Args:
        server: the label holder's name.
        label_cases: the label holder's keyed cases.
        site_cases: site -> its keyed cases.
        groups: modality -> its sites, in decoder order.

    Raises:
        SplitUNetDataError: two sites of one modality hold the same case.
    """
    pooled, holder = merge_modality_cases(groups, site_cases)
    matched = cases.match_cases({server: label_cases, **pooled})
    by_sites: dict[tuple[str, ...], list[str]] = {}
    for key in matched.common:
        by_sites.setdefault(tuple(holder[(modality, key)] for modality in groups), []).append(key)
    return CohortMatch(
        matched=matched,
        party_modality={group_party(sites): modality for modality, sites in groups.items()},
        keys_by_sites={sites: by_sites[sites] for sites in sorted(by_sites)},
    )


class CohortPlanner:
    """Crop plans one cohort at a time: which cohort a step uses, then that cohort's crops; seeded and resumable.

    Each cohort has its own :class:`~splitunet.data.sampling.RandomCropPlanner` over its training cases (cohort 0's
    with the run's seed, so one cohort plans exactly as a run without cohorts). With several cohorts, each step
    first draws its cohort from a generator of its own:

    - ``"proportional"``: cohort ``c`` with probability ``n_c / sum(n)`` (``n``: training cases), so every training
      case is as likely to be drawn as in one pooled sampler;
    - ``"round_robin"``: the cohorts in turn, whatever their sizes.

    A cohort left without any site taking part (``on_site_failure="continue"``) is skipped; one uniform draw is made
    per step whatever the outcome, so the sequence does not depend on which cohorts are left.

    Args:
        cohort_shapes: per cohort, its training case keys -> volume shape.
        crop_size: crop size ``(d, h, w)``.
        batch_size: crops per plan.
        seed: the run's seed.
        draw: one of :data:`COHORT_DRAWS`.
    """

    def __init__(
        self,
        cohort_shapes: Sequence[Mapping[str, Sequence[int]]],
        crop_size: Sequence[int],
        batch_size: int,
        seed: int,
        draw: str = "proportional",
    ):
        if not cohort_shapes:
            raise ValueError("a cohort planner needs at least one cohort")
        if draw not in COHORT_DRAWS:
            raise ValueError(f"draw must be one of {COHORT_DRAWS}, got {draw!r}")
        self.planners = [
            RandomCropPlanner(shapes, crop_size, batch_size, seed=seed + index * _PLANNER_SEED_STRIDE)
            for index, shapes in enumerate(cohort_shapes)
        ]
        self.sizes = [len(shapes) for shapes in cohort_shapes]
        self.draw = draw
        self.steps = [0] * len(self.planners)
        self._rng = np.random.default_rng(seed + _DRAW_SEED_OFFSET)
        self._turn = 0

    def next_plan(self, available: Sequence[bool] | None = None) -> tuple[int, dict]:
        """Draw the next step's cohort and its crop plan.

        Args:
            available: per cohort, whether any of its sites still takes part (default: all).

        Returns:
            ``(cohort index, plan)``.

        Raises:
            ValueError: no cohort is available.
        """
        available = [True] * len(self.planners) if available is None else [bool(a) for a in available]
        if len(available) != len(self.planners) or not any(available):
            raise ValueError(f"no cohort is available to draw from ({available})")
        index = self._draw(available)
        self.steps[index] += 1
        return index, self.planners[index].next_plan()

    def _draw(self, available: list[bool]) -> int:
        if len(self.planners) == 1:
            return 0
        if self.draw == "round_robin":
            count = len(self.planners)
            for offset in range(count):
                index = (self._turn + offset) % count
                if available[index]:
                    self._turn = (index + 1) % count
                    return index
        weights = np.array([size if ok else 0 for size, ok in zip(self.sizes, available)], dtype=np.float64)
        position = self._rng.random() * weights.sum()
        index = int(np.searchsorted(np.cumsum(weights), position, side="right"))
        # A draw on the last cumulative edge (rounding) stays with the last available cohort.
        return min(index, max(i for i, ok in enumerate(available) if ok))

    def state_dict(self) -> dict:
        """Everything needed to continue the same sequence of cohorts and plans (JSON-serializable)."""
        return {
            "draw": self.draw,
            "sizes": list(self.sizes),
            "steps": list(self.steps),
            "turn": self._turn,
            "bit_generator": self._rng.bit_generator.state,
            "planners": [planner.state_dict() for planner in self.planners],
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Resume from :meth:`state_dict` output (or from a single planner's, written before cohorts existed).

        Raises:
            ValueError: the saved state is for other cohorts, or for other cases, crop or batch sizes.
        """
        if "planners" not in state:
            if len(self.planners) != 1:
                raise ValueError(f"cannot resume sampling: saved one cohort, this run has {len(self.planners)}")
            self.planners[0].load_state_dict(state)
            return
        if list(state["sizes"]) != self.sizes or state["draw"] != self.draw:
            raise ValueError(
                f"cannot resume sampling: saved cohorts of {state['sizes']} training cases drawn {state['draw']!r}, "
                f"this run has {self.sizes} drawn {self.draw!r}"
            )
        for planner, saved in zip(self.planners, state["planners"]):
            planner.load_state_dict(saved)
        self.steps = [int(steps) for steps in state["steps"]]
        self._turn = int(state["turn"])
        self._rng.bit_generator.state = dict(state["bit_generator"])
