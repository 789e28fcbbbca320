"""What the server of a captured SplitFed run held: the encoder copies it averaged, the averages it sent back, the
activations it received, and how many local steps each site had taken since the average the server knows.

A ``split_unet_splitfed`` run made with ``CaptureFeatures`` (activations, every iteration of the attacked rounds)
and ``CaptureWeights`` (every averaging) leaves, in the server's run folder, exactly what crossed the server: each
averaged site's encoder copy as received, the average as sent to each site, and the activations of each site at
each iteration its cohort trained. :class:`SplitFedView` reads them back; nothing else of the run is read (the
server's ``results.json`` gives the averaging's weights, which the server computed from the case matching).

Local steps: a site that encodes at iteration ``t`` gets its gradients with the next task it receives and steps its
encoder then, and it is asked to encode only when its cohort is drawn. So the encoder behind its ``k``-th activations
after an average is the average plus ``k - 1`` Adam steps, and the copy it uploads at the next averaging is the one
behind its last activations of the round plus one step. The count needs every activation of the round, which is why
the attacked rounds are captured whole (:meth:`SplitFedView.attack_points` refuses a round that is not).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from splitunet.checkpoint import load_checkpoint
from splitunet.errors import SplitUNetConfigError
from splitunet.evaluation.leakage.captured_run import ACTIVATIONS, CapturedRun
from splitunet.filters.capture_weights import RECEIVED, SENT, weights_capture_path
from splitunet.flare.encoder_averaging import EncoderAveraging

__all__ = [
    "Averaging",
    "AttackPoint",
    "SplitFedView",
    "read_weights",
    "recompute_averages",
    "check_averages",
    "describe_view",
    "max_difference",
]

# The evaluator's recomputation and the server's both run EncoderAveraging on the same arrays: they agree to the bit
# unless the server averaged something else; this allows for a float32 rounding of another summation order.
_AVERAGE_TOLERANCE = 1e-6

State = dict[str, torch.Tensor]


def read_weights(captures_dir, direction: str, site: str, iteration: int) -> State:
    """One ``CaptureWeights`` record's weights.

    Raises:
        SplitUNetConfigError: the file is absent or unreadable, or records another site, iteration or direction.
    """
    path = weights_capture_path(captures_dir, direction, site, iteration)
    if not path.is_file():
        raise SplitUNetConfigError(f"no {direction} weights of {site} at iteration {iteration} ({path} is absent)")
    try:
        record = load_checkpoint(path)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise SplitUNetConfigError(f"weights capture {path} is unreadable: {error}") from error
    found = (record.get("site"), record.get("iteration"), record.get("direction"))
    if found != (site, int(iteration), direction) or not isinstance(record.get("weights"), dict):
        raise SplitUNetConfigError(f"weights capture {path} records {found}, not ({site}, {iteration}, {direction})")
    return dict(record["weights"])


@dataclass(frozen=True)
class Averaging:
    """One averaging as the server saw it.

    Args:
        iteration: the training iteration it followed.
        received: site -> its encoder copy as received.
        sent: site -> the average sent to it.
    """

    iteration: int
    received: dict[str, State]
    sent: dict[str, State]


@dataclass(frozen=True)
class AttackPoint:
    """One site's activations the server attacks, and what it knows of the encoder behind them.

    Args:
        site: the site.
        modality: its modality.
        averaging: the iteration of the last averaging before these activations (the average the server knows).
        iteration: the training iteration of the activations.
        local_steps: the site's Adam steps between taking that average and encoding these activations (0: the
            server knows the encoder exactly).
        next_averaging: for a round's last activations of the site, the averaging at which it uploads its copy (that
            encoder plus one step); ``None`` otherwise, or when that averaging was not captured.
    """

    site: str
    modality: str
    averaging: int
    iteration: int
    local_steps: int
    next_averaging: int | None = None


def _arrays(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: tensor.detach().cpu().numpy() for name, tensor in state.items()}


def recompute_averages(
    averaging: Averaging, modality_of: Mapping[str, str], case_counts: Mapping[str, int]
) -> dict[str, State]:
    """Each modality's average as the server computes it, from the copies it received (plain weighted averaging by
    training cases, :class:`~splitunet.flare.encoder_averaging.EncoderAveraging`).

    Returns:
        modality -> the average.
    """
    groups: dict[str, list[str]] = {}
    for site in averaging.received:
        groups.setdefault(modality_of[site], []).append(site)
    helper = EncoderAveraging(groups, {site: case_counts[site] for site in averaging.received}, every=1)
    uploads = {site: _arrays(state) for site, state in averaging.received.items()}
    averaged = helper.average(uploads, modality_of, averaging.iteration)
    return {modality: {n: torch.from_numpy(a.copy()) for n, a in state.items()} for modality, state in averaged.items()}


def max_difference(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> float:
    """Largest absolute difference over every entry of two states with the same names (inf if the names differ)."""
    if set(first) != set(second):
        return float("inf")
    return max(
        (float((first[name].double() - second[name].double()).abs().max()) for name in first if first[name].numel()),
        default=0.0,
    )


class SplitFedView:
    """The server's view of a captured SplitFed run.

    Args:
        run: the run's workspace, read back (:class:`~splitunet.evaluation.leakage.captured_run.CapturedRun`).
        captured_iterations: the training iterations whose activations the server recorded (the capture filter's
            setting): the rounds lying wholly inside them can be attacked.

    Raises:
        SplitUNetConfigError: the run averaged no encoders, or recorded no averaging.
    """

    def __init__(self, run: CapturedRun, captured_iterations: Iterable[int]):
        self.run = run
        averaging = run.server_results.get("encoder_averaging")
        if not averaging or not averaging.get("groups"):
            raise SplitUNetConfigError(f"the run in {run.workspace} averaged no encoders: not a SplitFed run")
        self.every = int(averaging["every"])
        self.drift_correction = averaging.get("drift_correction")
        self.case_counts = {site: int(n) for sites in averaging["groups"].values() for site, n in sites.items()}
        self.modality_of = {site: run.sites[site] for site in self.case_counts}
        self.last_iteration = int(run.server_results["iterations"])
        self.captured = frozenset(int(i) for i in captured_iterations)
        self.averagings: dict[int, Averaging] = {}
        for entry in averaging.get("history", []):
            iteration = int(entry["iteration"])
            sites = [
                site
                for site in sorted(entry["distance_to_average"])
                if weights_capture_path(run.captures_dir, RECEIVED, site, iteration).is_file()
            ]
            if not sites:
                continue
            received = {site: read_weights(run.captures_dir, RECEIVED, site, iteration) for site in sites}
            sent = {site: read_weights(run.captures_dir, SENT, site, iteration) for site in sites}
            self.averagings[iteration] = Averaging(iteration, received, sent)
        if not self.averagings:
            raise SplitUNetConfigError(
                f"{run.captures_dir} holds no averaging's weights: run the job with the CaptureWeights filter"
            )
        self.activations = {site: run.iterations(ACTIVATIONS, site) for site in self.modality_of}

    def average_sent(self, averaging: int, site: str) -> State:
        """The average the server sent ``site`` at the averaging after iteration ``averaging``."""
        return self.averagings[averaging].sent[site]

    def upload(self, averaging: int, site: str) -> State:
        """The encoder copy ``site`` uploaded at the averaging after iteration ``averaging``."""
        return self.averagings[averaging].received[site]

    def rounds(self) -> list[tuple[int, int]]:
        """``(averaging, end)`` of every round after a captured averaging whose iterations ``averaging + 1 .. end``
        were all captured (``end``: the next averaging's iteration, or the run's last)."""
        starts = sorted(self.averagings)
        rounds = []
        for start in starts:
            end = min(start + self.every, self.last_iteration)
            if end > start and all(t in self.captured for t in range(start + 1, end + 1)):
                rounds.append((start, end))
        return rounds

    def attack_points(self) -> list[AttackPoint]:
        """Per fully captured round and averaged site: its first activations after the average (0 local steps) and,
        if it encoded again in the round, its last (with the averaging that brings its next copy, if captured).

        Raises:
            SplitUNetConfigError: no round after a captured averaging was captured whole.
        """
        rounds = self.rounds()
        if not rounds:
            raise SplitUNetConfigError(
                f"no round after the averagings at {sorted(self.averagings)} had every iteration's activations "
                f"captured (captured: {sorted(self.captured)}); the local steps of the sites are then unknown"
            )
        points = []
        for start, end in rounds:
            for site in sorted(self.averagings[start].sent, key=_site_order):
                encoded = [t for t in self.activations[site] if start < t <= end]
                if not encoded:
                    continue  # its cohort was not drawn in this round
                modality = self.modality_of[site]
                points.append(AttackPoint(site, modality, start, encoded[0], 0))
                if len(encoded) > 1:
                    following = self.averagings.get(end)
                    upload = end if following is not None and site in following.received else None
                    points.append(AttackPoint(site, modality, start, encoded[-1], len(encoded) - 1, upload))
        return points


def _site_order(site: str) -> tuple:
    """``site-2`` before ``site-10``."""
    head, _, tail = site.rpartition("-")
    return (head, int(tail)) if tail.isdigit() else (site, 0)


def check_averages(view: SplitFedView) -> dict:
    """Recompute every captured average from the copies the server received; compare with what it sent.

    Returns:
        ``{"averagings": {iteration: {"sites", "max_abs_difference"}}, "max_abs_difference", "tolerance",
        "matches"}``, or ``{"checked": False, "reason"}`` when the run corrected its averages (DWCS: the
        recomputation would need the correction's state, which this check does not rebuild).
    """
    if view.drift_correction is not None:
        return {"checked": False, "reason": "the run corrected its averages for drift (DWCS); not recomputed"}
    result: dict = {"checked": True, "averagings": {}}
    worst = 0.0
    for iteration, averaging in sorted(view.averagings.items()):
        recomputed = recompute_averages(averaging, view.modality_of, view.case_counts)
        differences = {
            site: max_difference(recomputed[view.modality_of[site]], sent) for site, sent in averaging.sent.items()
        }
        largest = max(differences.values(), default=0.0)
        worst = max(worst, largest)
        sites = sorted(averaging.sent, key=_site_order)
        result["averagings"][iteration] = {"sites": sites, "max_abs_difference": largest}
    result.update(max_abs_difference=worst, tolerance=_AVERAGE_TOLERANCE, matches=worst <= _AVERAGE_TOLERANCE)
    return result


def describe_view(view: SplitFedView, points: Sequence[AttackPoint]) -> dict:
    """What the server held, by count and shape: averagings captured, copies and their parameters, activation
    captures and the levels they carry."""
    first = next(iter(view.averagings.values()))
    copy = next(iter(first.received.values()))
    sample = points[0] if points else None
    levels = {}
    if sample is not None:
        capture = view.run.capture(ACTIVATIONS, sample.site, sample.iteration)
        levels = {f"x{level}": [int(s) for s in tensor.shape[1:]] for level, tensor in sorted(capture.observed.items())}
    return {
        "averagings": sorted(view.averagings),
        "copies_per_averaging": {iteration: len(a.received) for iteration, a in sorted(view.averagings.items())},
        "parameters_per_copy": int(sum(t.numel() for t in copy.values() if t.is_floating_point())),
        "activation_captures": {site: len(its) for site, its in sorted(view.activations.items())},
        "levels_received": levels,
        "rounds_attacked": [list(r) for r in view.rounds()],
    }
