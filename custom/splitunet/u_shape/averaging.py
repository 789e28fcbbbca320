"""One round's federated averaging of the hospitals' heads and tails, with the optional DWCS correction.

Each part is averaged over the hospitals weighted by their training cases
(:func:`~splitunet.federated.averaging.weighted_average`); with a
:class:`~splitunet.federated.drift_correction.DriftCorrection` the averaged part is then pulled towards its own
average of the previous round (DWCS, Yang et al.). The middle is one model at the server and is never averaged.
Plain torch: the FLARE workflow and the in-process runner both call :func:`average_parts`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from splitunet.federated.averaging import weighted_average
from splitunet.federated.drift_correction import DriftCorrection
from splitunet.u_shape.protocol import HOSPITAL_PARTS

__all__ = ["average_parts", "make_correction"]

PartsState = Mapping[str, Mapping[str, torch.Tensor]]


def make_correction(settings: Mapping | None) -> DriftCorrection | None:
    """The job's DWCS: ``None`` (plain FedAvg) or :class:`DriftCorrection`'s arguments (``{}``: its defaults)."""
    return None if settings is None else DriftCorrection(**dict(settings))


def average_parts(
    uploads: Mapping[str, PartsState],
    case_counts: Mapping[str, int],
    round_index: int,
    correction: DriftCorrection | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Average each hospital part over the hospitals, weighted by case counts, then correct it (if asked).

    Args:
        uploads: hospital -> part (``"head"``, ``"tail"``) -> state dict.
        case_counts: hospital -> its training cases.
        round_index: the round just finished (0-based); DWCS leaves round 0 as averaged.
        correction: DWCS, kept across rounds by the caller (it remembers each part's previous average).

    Returns:
        part -> averaged (and corrected) state dict.
    """
    parties = sorted(uploads)
    if not parties:
        raise ValueError("no hospital sent its weights")
    missing = [party for party in parties if party not in case_counts]
    if missing:
        raise ValueError(f"no case count for {missing}")
    weights = [case_counts[party] for party in parties]
    averaged = {}
    for part in HOSPITAL_PARTS:
        state = weighted_average([uploads[party][part] for party in parties], weights)
        averaged[part] = state if correction is None else correction.apply(state, round_index, part=part)
    return averaged
