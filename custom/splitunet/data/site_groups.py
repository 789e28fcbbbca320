"""A vertical partition's patients dealt to several groups of sites, one site per modality in each group (SplitFed).

``splitunet partition`` writes one folder per modality holding every patient. For a consortium in which several
sites hold each modality, each for other patients, this module deals the patients into ``num_groups`` groups and
writes, per group, one folder per modality holding that group's patients only::

    out_dir/group-1/flair/<case>.nii.gz   out_dir/group-1/t1/...   (party.json lists the group's cases)
    out_dir/group-2/flair/<case>.nii.gz   ...

The label holder keeps the partition's ``labels/`` folder with every patient. With the sites named by
:func:`group_sites`, group ``g``'s sites hold the same patients and form one cohort
(:mod:`splitunet.server.cohorts`). :func:`write_groups` writes groups chosen by the caller instead of dealt ones
(each of ``splitunet compare``'s hospitals becomes one group).

Example::

    from splitunet.data.site_groups import group_sites, split_patients

    folders = split_patients("parties", "parties_by_group", num_groups=2, seed=0)
    sites = group_sites(2)  # {"site-1": ("flair", 0), ..., "site-5": ("flair", 1), ...}
    data_dir = {site: folders[group] / modality for site, (modality, group) in sites.items()}
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import numpy as np

from splitunet.atomic_files import write_json_atomic
from splitunet.data.nifti_io import nifti_case_id
from splitunet.data.partition import PARTY_FILE
from splitunet.wire.protocol import LABELS_PARTY, MODALITIES

__all__ = ["split_patients", "write_groups", "group_sites"]


def group_sites(num_groups: int, modalities: tuple[str, ...] = MODALITIES) -> dict[str, tuple[str, int]]:
    """Simulator site names for ``num_groups`` sites per modality: site -> ``(modality, group index)``.

    Group 0 is ``site-1`` .. ``site-4`` (flair, t1, t1gd, t2), as in a run with one site per modality; group 1 is
    ``site-5`` .. ``site-8``, and so on.
    """
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be an int >= 1, got {num_groups!r}")
    return {
        f"site-{group * len(modalities) + index + 1}": (modality, group)
        for group in range(num_groups)
        for index, modality in enumerate(modalities)
    }


def _place(source: Path, target: Path) -> None:
    """A hard link where the file system allows one (the volumes are read only), else a copy."""
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def split_patients(
    partition_dir: str | PathLike, out_dir: str | PathLike, num_groups: int, seed: int = 0
) -> list[Path]:
    """Deal a partition's patients into ``num_groups`` groups and write each group's modality folders.

    The patients (those of the ``labels`` folder) are shuffled by ``seed`` and dealt in turn, so group sizes differ
    by at most one. A group folder that exists is rewritten.

    Args:
        partition_dir: a ``splitunet partition`` output (``flair/``, ``t1/``, ``t1gd/``, ``t2/``, ``labels/``).
        out_dir: where the group folders go.
        num_groups: how many sites hold each modality.
        seed: seed of the deal.

    Returns:
        the group folders, ``out_dir/group-1`` first.

    Raises:
        ValueError: fewer patients than groups, or a modality folder lacks a patient of the labels.
    """
    partition_dir = Path(partition_dir)
    group_sites(num_groups)  # checks num_groups
    cases = _label_cases(partition_dir)
    if len(cases) < num_groups:
        raise ValueError(f"{len(cases)} patients cannot fill {num_groups} groups")
    order = [cases[i] for i in np.random.default_rng(seed).permutation(len(cases))]
    return write_groups(partition_dir, out_dir, [order[group::num_groups] for group in range(num_groups)])


def write_groups(partition_dir: str | PathLike, out_dir: str | PathLike, groups: Sequence[Sequence[str]]) -> list[Path]:
    """Write the given groups of patients as group folders, one folder per modality each (``group-1`` first).

    A patient of the labels folder in no group is held by no site, so the server leaves it out of the run. A group
    folder that exists is rewritten.

    Args:
        partition_dir: a ``splitunet partition`` output.
        out_dir: where the group folders go.
        groups: per group, its patients' case IDs (group ``g`` is held by the sites :func:`group_sites` gives it).

    Returns:
        the group folders, in the order of ``groups``.

    Raises:
        ValueError: no group, an empty group, a patient in two groups or not in the labels folder, or a modality
            folder lacks a patient of a group.
    """
    partition_dir, out_dir = Path(partition_dir), Path(out_dir)
    groups = [sorted(members) for members in groups]
    group_sites(len(groups))  # at least one group
    labelled, seen = set(_label_cases(partition_dir)), {}
    for group, members in enumerate(groups, start=1):
        if not members:
            raise ValueError(f"group-{group} has no patient")
        for case in members:
            if case in seen:
                raise ValueError(f"patient {case} is in group-{seen[case]} and group-{group}")
            if case not in labelled:
                raise ValueError(f"patient {case} of group-{group} is not in {partition_dir / LABELS_PARTY}")
            seen[case] = group
    folders = []
    for group, members in enumerate(groups):
        folder = out_dir / f"group-{group + 1}"
        for modality in MODALITIES:
            source, target = partition_dir / modality, folder / modality
            files = {nifti_case_id(path): path for path in source.iterdir() if nifti_case_id(path)}
            missing = [case for case in members if case not in files]
            if missing:
                raise ValueError(f"{source} lacks patients {missing[:3]} of the labels folder")
            if target.exists():
                shutil.rmtree(target)
            target.mkdir(parents=True)
            for case in members:
                _place(files[case], target / files[case].name)
            description = json.loads((source / PARTY_FILE).read_text()) if (source / PARTY_FILE).is_file() else None
            if description is not None:
                write_json_atomic({**description, "cases": members}, target / PARTY_FILE)
        folders.append(folder)
    return folders


def _label_cases(partition_dir: Path) -> list[str]:
    """The partition's patients: those of its labels folder, sorted."""
    return sorted(filter(None, (nifti_case_id(path) for path in (partition_dir / LABELS_PARTY).iterdir())))
