"""Averaging the encoders of the sites that share a modality, every R training iterations, with FLARE's aggregation.

With several sites per modality (docs/topologies.md, "Several sites per modality") each site trains its own copy of
its modality's encoder on its own patients. Every ``every`` iterations the server collects the copies (FLARE
``WEIGHTS`` DXOs, through the sites' result filters), averages each modality's copies weighted by the sites'
numbers of training cases with FLARE's :class:`WeightedAggregationHelper`, optionally corrects the average for
client drift (:class:`~splitunet.federated.drift_correction.DriftCorrection`, DWCS, as the U-shape job does), and
sends the same average back to every site of the modality::

    w_m = sum_{s holds m} n_s * w_s / sum_{s holds m} n_s        (n_s: site s's training cases)
    w_m = DWCS(w_m, round r)                                      (with drift correction)

With ``fedprox_mu`` > 0 the average also goes down with FedProx's ``mu``: each site then adds the proximal gradient
``mu (w - w_m)`` towards it to its encoder's gradients until the next average (:mod:`splitunet.site.trainer`); the
server computes nothing more for it.

A modality held by one site is never averaged; a run with one site per modality never averages at all. The server
sees every copy it averages: see the docs for what that reveals.

With DP-SGD at the sites (``split_unet_dp``, docs/dp.md) the averaging spends no epsilon: each copy is its site's
DP-SGD output at the epsilon the site recorded when it sent it, and the average, its correction and the distances
recorded are computed from the copies and the weights ``n_s`` alone, so they are post-processing, covered as far as
the copies are (docs/dp.md says how far). ``n_s`` is a count of cases, which DP-SGD does not cover (as in FedAvg).
Nothing here may read a site's data or its gradients: the averaging would then need an epsilon of its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper

from splitunet.federated.drift_correction import DriftCorrection

__all__ = ["EncoderAveraging", "make_correction"]

Arrays = Mapping[str, np.ndarray]


def make_correction(settings: Mapping | None) -> DriftCorrection | None:
    """The job's DWCS: ``None`` (plain weighted averaging) or :class:`DriftCorrection`'s arguments (``{}``: its
    defaults)."""
    return None if settings is None else DriftCorrection(**dict(settings))


def _relative_distance(state: Arrays, average: Arrays) -> float:
    """``||w - avg|| / ||avg||`` over every floating-point array: how far a copy drifted from the average."""
    diff = sum(float(np.sum((state[k].astype(np.float64) - average[k].astype(np.float64)) ** 2)) for k in average)
    norm = sum(float(np.sum(average[k].astype(np.float64) ** 2)) for k in average)
    return float(np.sqrt(diff / norm)) if norm > 0 else 0.0


class EncoderAveraging:
    """When to average which sites' encoders, the averaging itself, and its record; resumable.

    Args:
        groups: modality -> its sites (every modality of the run; those with one site are never averaged).
        case_counts: site -> its number of training cases (the server knows them from the case matching).
        every: average after every this many training iterations (0: never).
        correction: DWCS applied to each modality's average (``None``: plain weighted averaging).
        fedprox_mu: FedProx's ``mu`` sent with each average (0: none), finite and >= 0.

    Attributes:
        rounds: averaging rounds done.
        history: per round, ``{"iteration", "distance_to_average": {site: ||w_s - w|| / ||w||}}`` (before the
            correction), what ``results.json`` keeps.
    """

    def __init__(
        self,
        groups: Mapping[str, Sequence[str]],
        case_counts: Mapping[str, int],
        every: int,
        correction: DriftCorrection | None = None,
        fedprox_mu: float = 0.0,
    ):
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"every must be an int >= 0, got {every!r}")
        finite = isinstance(fedprox_mu, (int, float)) and not isinstance(fedprox_mu, bool) and np.isfinite(fedprox_mu)
        if not finite or fedprox_mu < 0:
            raise ValueError(f"fedprox_mu must be a finite number >= 0, got {fedprox_mu!r}")
        self.groups = {modality: list(sites) for modality, sites in groups.items() if len(sites) > 1}
        missing = [site for sites in self.groups.values() for site in sites if case_counts.get(site, 0) < 1]
        if missing:
            raise ValueError(f"sites {missing} have no training case to weigh their encoders by")
        self.case_counts = {site: int(case_counts[site]) for sites in self.groups.values() for site in sites}
        self.every = every
        self.correction = correction
        self.fedprox_mu = float(fedprox_mu)
        self.rounds = 0
        self.history: list[dict] = []

    @property
    def enabled(self) -> bool:
        """Whether this run averages at all: some modality has two sites and ``every`` > 0."""
        return bool(self.groups) and self.every > 0

    def due(self, iteration: int) -> bool:
        """Whether to average after training iteration ``iteration``."""
        return self.enabled and iteration % self.every == 0

    def sites_to_average(self, active: Sequence[str]) -> list[str]:
        """The active sites of every modality that still has two active sites, in the order of ``active``."""
        averaged = set()
        for sites in self.groups.values():
            present = [site for site in sites if site in active]
            if len(present) > 1:
                averaged.update(present)
        return [site for site in active if site in averaged]

    def average(self, uploads: Mapping[str, Arrays], modality_of: Mapping[str, str], iteration: int) -> dict:
        """Average each modality's uploaded encoders (weighted by training cases), then correct them if asked.

        Args:
            uploads: site -> its encoder's arrays (:func:`~splitunet.flare.encoder_weights.dxo_to_encoder`).
            modality_of: site -> modality.
            iteration: the training iteration just done (recorded).

        Returns:
            modality -> the averaged arrays, in each array's own dtype.

        Raises:
            ValueError: a site that is not averaged sent weights, or the uploads of a modality differ in names.
        """
        foreign = sorted(site for site in uploads if site not in self.case_counts)
        if foreign:
            raise ValueError(f"sites {foreign} hold a modality no other site holds; their encoders are not averaged")
        by_modality: dict[str, list[str]] = {}
        for site in sorted(uploads):
            by_modality.setdefault(modality_of[site], []).append(site)
        averaged, distances = {}, {}
        for modality, sites in by_modality.items():
            names = set(uploads[sites[0]])
            for site in sites[1:]:
                if set(uploads[site]) != names:
                    raise ValueError(f"the {modality} encoders of {sites[0]} and {site} have other parameter names")
            average = self._weighted(uploads, sites)
            for site in sites:
                distances[site] = round(_relative_distance(uploads[site], average), 6)
            if self.correction is not None:
                corrected = self.correction.apply(
                    {name: torch.from_numpy(array) for name, array in average.items()},
                    self.rounds,
                    part=f"encoder/{modality}",
                )
                average = {name: tensor.numpy() for name, tensor in corrected.items()}
            averaged[modality] = average
        self.history.append({"iteration": int(iteration), "distance_to_average": distances})
        self.rounds += 1
        return averaged

    def _weighted(self, uploads: Mapping[str, Arrays], sites: Sequence[str]) -> dict[str, np.ndarray]:
        """FLARE's weighted aggregation, in float64 and in site-name order, so the result does not depend on the
        order replies arrived in; integer arrays (counters) take the maximum, as
        :func:`~splitunet.federated.averaging.weighted_average` does."""
        helper = WeightedAggregationHelper()
        for site in sorted(sites):
            floating = {n: a.astype(np.float64) for n, a in uploads[site].items() if a.dtype.kind == "f"}
            helper.add(floating, self.case_counts[site], site, self.rounds)
        result = helper.get_result()
        reference = uploads[sites[0]]
        average = {}
        for name, array in reference.items():
            if array.dtype.kind == "f":
                average[name] = np.asarray(result[name]).astype(array.dtype)
            else:
                average[name] = np.maximum.reduce([np.asarray(uploads[site][name]) for site in sites])
        return average

    def describe(self) -> dict:
        """What ``results.json`` keeps (``encoder_averaging``): settings, weights, rounds; keys and IDs never."""
        return {
            "every": self.every,
            "groups": {
                modality: {site: self.case_counts[site] for site in sites} for modality, sites in self.groups.items()
            },
            "weighted_by": "training cases",
            "drift_correction": self.correction.describe() if self.correction is not None else None,
            "fedprox_mu": self.fedprox_mu,
            "rounds": self.rounds,
            "history": [dict(entry) for entry in self.history],
        }

    def state_dict(self) -> dict:
        """Rounds, history and the drift correction's stored averages (for the server's checkpoint)."""
        return {
            "rounds": self.rounds,
            "history": [dict(entry) for entry in self.history],
            "correction": self.correction.state_dict() if self.correction is not None else None,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict` output.

        Raises:
            ValueError: the checkpoint was written with drift correction and this run has none, or the reverse.
        """
        if (state.get("correction") is None) != (self.correction is None):
            raise ValueError(
                "cannot resume the encoder averaging: the checkpoint was written "
                f"{'without' if state.get('correction') is None else 'with'} drift correction, this run "
                f"{'has none' if self.correction is None else 'has it'}"
            )
        self.rounds = int(state["rounds"])
        self.history = [dict(entry) for entry in state["history"]]
        if self.correction is not None:
            self.correction.load_state_dict(state["correction"])
