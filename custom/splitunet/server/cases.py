"""Which cases a run uses: those every party holds, voxel-aligned across parties, split by seed.

Parties describe their cases by keyed hash (``{key: {"shape": [...], "affine_digest": "..."}}``, see
:mod:`splitunet.data.case_keys`). A case some party lacks is left out with a note; a case whose grids differ
between parties stops the run, naming the party and the case (by key in what the server's run folder keeps, see
:mod:`splitunet.server.private_details`). Training matches the sites against the server's labels; inference
matches the sites against each other (docs/design.md, "Wire contract").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from splitunet.data.case_keys import match_case_keys
from splitunet.errors import SplitUNetConfigError, SplitUNetDataError

__all__ = [
    "MatchedCases",
    "match_cases",
    "training_notes",
    "inference_notes",
    "check_training_cases",
    "check_aligned_with_labels",
    "check_inference_cases",
    "split_cases",
]

# Per party: case key -> description ({"shape": [...], "affine_digest": "..."}).
CasesByParty = Mapping[str, Mapping[str, Mapping]]


@dataclass
class MatchedCases:
    """Case keys matched across parties.

    Attributes:
        common: keys present at every party, sorted.
        missing: for each party that lacks some, the keys other parties have, sorted.
    """

    common: list[str] = field(default_factory=list)
    missing: dict[str, list[str]] = field(default_factory=dict)

    @property
    def left_out(self) -> dict[str, int]:
        """How many cases each party lacks (``results.json``: ``left_out_cases``)."""
        return {party: len(keys) for party, keys in self.missing.items() if keys}


def match_cases(cases_by_party: CasesByParty) -> MatchedCases:
    """Match the parties' keyed case lists."""
    match = match_case_keys({party: cases.keys() for party, cases in cases_by_party.items()})
    return MatchedCases(common=list(match.common), missing={party: list(keys) for party, keys in match.missing.items()})


def training_notes(
    matched: MatchedCases,
    server: str,
    modality_of: Mapping[str, str],
    case_name: Callable[[str], str] | None = None,
) -> list[str]:
    """One warning per case left out of training, naming the case by its full key.

    Args:
        matched: the match of the server's and the sites' cases.
        server: the label holder's name.
        modality_of: site -> modality.
        case_name: key -> case ID, for the label holder's private details only (the run folder gets keys).
    """
    notes = []
    for party, missing in matched.missing.items():
        for key in missing:
            where = "has no label" if party == server else f"is missing at {party} ({modality_of[party]})"
            case = f" (case {case_name(key)})" if case_name else ""
            notes.append(f"case key {key}{case} {where}; left out of training")
    return notes


def inference_notes(matched: MatchedCases, modality_of: Mapping[str, str]) -> list[str]:
    """One warning per case skipped at inference, naming the case by its full key."""
    return [
        f"case key {key} is missing at {site} ({modality_of[site]}); skipped"
        for site, missing in matched.missing.items()
        for key in missing
    ]


def _misaligned(
    reference_cases: Mapping[str, Mapping], other_cases: CasesByParty, keys: Sequence[str]
) -> Iterator[tuple[str, str]]:
    """``(key, party)`` whose grid (affine digest, which covers the shape) differs from the reference's."""
    for key in keys:
        for party, cases in other_cases.items():
            if cases[key]["affine_digest"] != reference_cases[key]["affine_digest"]:
                yield key, party


def check_training_cases(
    matched: MatchedCases,
    label_cases: Mapping[str, Mapping],
    site_cases: CasesByParty,
    modality_of: Mapping[str, str],
    case_name: Callable[[str], str],
    label_file: Callable[[str], str | Path],
) -> dict[str, tuple[int, ...]]:
    """Check the cases common to the labels and every site; returns each one's shape.

    Args:
        matched: the match of the server's and the sites' cases.
        label_cases: the server's label cases.
        site_cases: per site (in decoder order), its cases.
        modality_of: site -> modality.
        case_name: key -> case ID (the server holds the IDs of its labels).
        label_file: case ID -> the label file (named in errors, for the label holder's private details: see
            :meth:`~splitunet.server.private_details.PrivateDetails.public_error`).

    Raises:
        SplitUNetConfigError: fewer than two common cases (one to train on, one to validate).
        SplitUNetDataError: a site's volume is not on the grid of its label (with the case, its key and the label
            file).
    """
    if len(matched.common) < 2:
        raise SplitUNetConfigError(f"only {len(matched.common)} cases are present at every party; need at least 2")
    return check_aligned_with_labels(matched.common, label_cases, site_cases, modality_of, case_name, label_file)


def check_aligned_with_labels(
    keys: Sequence[str],
    label_cases: Mapping[str, Mapping],
    site_cases: CasesByParty,
    modality_of: Mapping[str, str],
    case_name: Callable[[str], str],
    label_file: Callable[[str], str | Path],
) -> dict[str, tuple[int, ...]]:
    """Check that every site's volume of each of ``keys`` is on its label's grid; returns each key's shape.

    Args:
        keys: case keys every site of ``site_cases`` holds.
        label_cases, modality_of, case_name, label_file: as :func:`check_training_cases`.
        site_cases: per site, its cases.

    Raises:
        SplitUNetDataError: as :func:`check_training_cases`.
    """
    for key, site in _misaligned(label_cases, site_cases, keys):
        raise SplitUNetDataError(
            f"{modality_of[site]} volume (shape {site_cases[site][key]['shape']}) is not voxel-aligned with the label "
            f"(shape {label_cases[key]['shape']}): shape or affine differs",
            party=site,
            case=case_name(key),
            case_key=key,
            file=label_file(case_name(key)),
        )
    return {key: tuple(label_cases[key]["shape"]) for key in keys}


def check_inference_cases(
    matched: MatchedCases, site_cases: CasesByParty, modality_of: Mapping[str, str]
) -> dict[str, tuple[int, ...]]:
    """Check the cases common to every site (in decoder order, the first is the reference); returns their shapes.

    Raises:
        SplitUNetDataError: no common case, or a site's volume is not on the grid of the first site's.
    """
    sites = list(site_cases)
    if not matched.common:
        raise SplitUNetDataError("no case is present at every site taking part", party=sites[0])
    reference = sites[0]
    others = {site: site_cases[site] for site in sites[1:]}
    for key, site in _misaligned(site_cases[reference], others, matched.common):
        raise SplitUNetDataError(
            f"the {modality_of[site]} volume at {site} (shape {site_cases[site][key]['shape']}) "
            f"is not voxel-aligned with the {modality_of[reference]} volume at {reference} "
            f"(shape {site_cases[reference][key]['shape']})",
            party=site,
            case_key=key,
        )
    return {key: tuple(site_cases[reference][key]["shape"]) for key in matched.common}


def split_cases(keys: Sequence[str], num_val_cases: int, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split into ``(train, validation)`` keys, each sorted; at least one case is left to train on."""
    rng = np.random.default_rng(seed)
    order = [keys[i] for i in rng.permutation(len(keys))]
    num_val = min(num_val_cases, len(order) - 1)
    return sorted(order[num_val:]), sorted(order[:num_val])
