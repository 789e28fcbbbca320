"""Which sites take part in a run and in each step: site dropout and modality dropout, in one resumable place."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["SiteRoster"]


class SiteRoster:
    """The sites of a run in decoder order, the ones still taking part, and the ones sitting out a step.

    A site that failed or went silent is *dropped* for the rest of the run (recorded with iteration and
    reason). With ``modality_dropout > 0`` every training step also leaves each active site out with that
    probability, always keeping at least one, so that a mean-fusion decoder learns to predict without any
    given modality. The draws come from a generator of their own, saved with :meth:`state_dict`, so a resumed
    run leaves out the same sites as an uninterrupted one.

    Args:
        sites: site names in decoder order.
        modality_of: site name -> modality (used in messages and records).
        modality_dropout: probability in [0, 1) that an active site sits out a training step.
        seed: seed of the dropout draws.
    """

    def __init__(
        self, sites: Sequence[str], modality_of: Mapping[str, str], modality_dropout: float = 0.0, seed: int = 0
    ):
        if not sites:
            raise ValueError("a roster needs at least one site")
        if not 0.0 <= modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1), got {modality_dropout}")
        self.sites = list(sites)
        self.modality_of = {site: modality_of[site] for site in self.sites}
        self.modality_dropout = float(modality_dropout)
        self.dropped: list[dict] = []
        self._rng = np.random.default_rng(seed)

    @property
    def active(self) -> list[str]:
        """Sites still taking part, in decoder order."""
        gone = {record["site"] for record in self.dropped}
        return [site for site in self.sites if site not in gone]

    def drop(self, site: str, iteration: int, reason: str) -> dict:
        """Leave ``site`` out for the rest of the run; returns the record kept in ``dropped``."""
        if site not in self.active:
            raise ValueError(f"site {site} is not taking part, so it cannot be dropped")
        record = {"site": site, "modality": self.modality_of[site], "iteration": int(iteration), "reason": reason}
        self.dropped.append(record)
        return record

    def step_participants(self, among: Sequence[str] | None = None) -> list[str]:
        """Draw the active sites that take part in the next training step (all of them without dropout).

        Args:
            among: the sites that could take part (a step's cohort, see :mod:`splitunet.server.cohorts`); default
                every site. Only the active ones among them are drawn from.
        """
        active = self.active if among is None else [site for site in self.active if site in among]
        if not active:
            return []
        if self.modality_dropout == 0.0:
            return active
        # Two draws every step, whatever the outcome, so the sequence does not depend on earlier outcomes.
        sits_out = self._rng.random(len(active)) < self.modality_dropout
        keeper = int(self._rng.integers(len(active)))
        sits_out[keeper] = sits_out[keeper] and not sits_out.all()
        return [site for site, out in zip(active, sits_out) if not out]

    def state_dict(self) -> dict:
        """Dropped sites and the dropout generator (for checkpoints)."""
        return {"dropped": [dict(record) for record in self.dropped], "bit_generator": self._rng.bit_generator.state}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict` output."""
        unknown = {record["site"] for record in state["dropped"]} - set(self.sites)
        if unknown:
            raise ValueError(f"saved roster drops sites {sorted(unknown)} that are not in this run {self.sites}")
        self.dropped = [dict(record) for record in state["dropped"]]
        self._rng.bit_generator.state = dict(state["bit_generator"])
