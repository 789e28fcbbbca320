"""``splitunet compare``: every topology trained on the same phantom patients for the same budget, scored on the same
held-out cases, under paired seeds.

The topologies (:data:`TOPOLOGIES`, one row each; the first is the reference of the paired differences):

* vertical Split-U-Net (one modality per site, the server holds decoder and labels): ``split_unet_fp32``, the
  main int8 job ``split_unet`` (:func:`splitunet.tools.demo.run_demo`) and the same with DP-SGD on every site's
  encoder at target epsilon 3 (``split_unet_dp_eps3``, job ``split_unet_dp``);
* SplitFed, the vertical job with a site per modality *and hospital* (``split_unet_splitfed``, int8 like the main
  job, :func:`splitunet.tools.splitfed_demo.run_splitfed_demo`): each hospital's patients are one cohort of four
  sites, and the encoders of each modality's sites are averaged every ``steps / rounds`` iterations, plainly
  weighted (``splitfed``), with DWCS (``splitfed_dwcs``) and with FedProx at the sites (``splitfed_fedprox``,
  ``fedprox_mu``);
* horizontal FedAvg, FedAvg with FedProx's proximal term (``fedavg_unet``,
  :func:`splitunet.horizontal.demo.run_fedavg_demo`), FedAvg with DWCS on each round's global model
  (``fedavg_unet_dwcs``, :class:`splitunet.horizontal.DriftCorrectedFedAvg`) and FedAvg with DP-SGD at every
  hospital at target epsilon 1, 3 and 10 (``fedavg_unet_dp``, ``fedavg_dp_eps1`` ...);
* the U-shape, plain FedAvg of heads and tails and with DWCS (``u_shape_unet``,
  :func:`splitunet.u_shape.demo.run_u_shape_demo`);
* the centralized baseline (every hospital's training cases pooled, in this process).

So each topology that averages has its drift treatments side by side: FedAvg, FedProx and DWCS; the U-shape without
and with DWCS; SplitFed plain, with DWCS and with FedProx. The DP rows sit beside their topology's plain rows.

Same patients. Seed ``s`` writes non-IID hospitals with :func:`splitunet.data.hospitals.generate_hospitals`
(:data:`~splitunet.data.hospitals.NON_IID_PROFILES`, renamed ``hospital-1``, ... as the horizontal and U-shape
runners name their clients; case IDs run on across hospitals, so none is shared) into ``<out>/data_seed<s>/``. The
vertical job's MSD source, ``data_seed<s>/phantom_msd/``, is the union of those hospitals' cases: its
``dataset.json`` lists every hospital's image and label files by relative path (no copy), and the vertical
runner partitions it into one folder per modality and the labels. Every topology of seed ``s`` thus trains and
validates on the very same volumes.

Same held-out cases. The hospitals (FedAvg and U-shape alike) each hold out ``val_cases_per_hospital`` cases by the
same seeded permutation of their sorted case IDs (``split_cases`` and ``split_hospital_cases`` draw the same one).
The vertical controller holds out ``hospitals * val_cases_per_hospital`` cases by a seeded permutation of the sorted
case *keys* (HMAC of the case ID under the data holders' secret). The secret of a simulation is ours to choose, so
:func:`choose_secret` tries deterministic candidates until the vertical split holds out exactly the union of the
hospitals' held-out cases, and writes it where the vertical runner reads it. The SplitFed server holds out
``val_cases_per_hospital`` cases per cohort, each by the same seeded permutation of its own sorted keys
(:mod:`splitunet.server.cohorts`); :func:`choose_cohort_secret` finds a second secret under which every hospital's
cohort holds out exactly that hospital's cases, kept in a file of its own (``case_key_secret_splitfed.txt``) so that
the vertical rows' secret stays what it is. After each run the held-out cases are checked: a split server's
recorded keys must be the keys of those cases (a mismatch stops the study), and each hospital's (or cohort's) count
must be its share. Each row's Dice is the mean over those cases: the vertical server's
``DiceMetric`` averages over its held-out cases; the hospitals' Dice are pooled weighted by their held-out counts.

Same budget. Every model takes ``steps`` AdamW steps on crops of ``batch_size``: the vertical decoder and encoders
``steps`` iterations; each FedAvg hospital ``rounds`` rounds of ``steps / rounds`` local steps; each U-shape head,
tail and the middle ``rounds`` rounds of ``steps / rounds`` iterations; the SplitFed decoder ``steps`` iterations,
each on one cohort's batch (drawn in proportion to the cohorts' training cases), with ``rounds`` encoder averages,
so a SplitFed encoder takes about ``steps / hospitals`` steps. Every topology gets the same crop size,
U-Net features, learning rate and training seed ``s`` (crop sampling and initialisation), except the vertical and
SplitFed sites' encoders: each site draws a private encoder seed, as it does in deployment.

With ``curve_every``, every run is also scored on the way (at each multiple of it), and the report adds each row's
learning curve and whether it stopped moving: the end of each run against its own half-budget point, paired by seed
(:func:`curve_markdown`, :mod:`splitunet.evaluation.budget_change`).

Reported per row: Dice TC, WT, ET (mean over seeds) and the paired difference to the first row with its 95 %
Student's t interval (:func:`splitunet.evaluation.utility.paired_interval`); upload bytes per iteration (tensor bytes
all data holders together send the server per training iteration, as received: the vertical sites' activations,
SplitFed's activations plus every site's encoder weights once a round, the U-shape's ``x0`` and ``dL/du2`` plus the
round's weights, FedAvg's weights of every hospital once a round);
wall seconds per iteration (the whole run, simulator start-up and validation included, over the iterations);
rounds, and HD95 per region (:mod:`splitunet.region_scores`, mean over seeds); for the DP rows the epsilon spent per
data holder (each FedAvg hospital, each vertical site), the largest over holders and seeds, at the delta of the
job's own rule (``min(1e-5, 1/(10 N))``, docs/dp.md), also reported. Below the table, each drift treatment (DWCS,
FedProx) against its own topology's plain row, and DWCS against FedProx, paired by seed
(:mod:`splitunet.evaluation.drift_treatments`).

Each run keeps its folder, ``seed<s>/<topology>/``, with the runner's ``results.json`` and ``compare_run.json`` (the
row's figures and the settings they were measured under); a rerun with the same out folder and settings reuses
finished runs, so a long study can be stopped and continued. A run is reused when its settings' fingerprint
(:meth:`CompareSettings.fingerprint`; a field added to the settings later enters it only at a non-default value, so
a study under way keeps its runs) and, for a DP row, the DP settings it ran with are what the rerun would use.
``compare.json`` carries every run's record, so parts of one study run on several machines (some seeds here, some
rows there) merge by reusing their ``compare.json`` files in a new out folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import math
import shutil
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from splitunet.atomic_files import write_json_atomic, write_text_atomic
from splitunet.data.case_keys import case_key
from splitunet.data.hospitals import NON_IID_PROFILES, generate_hospitals
from splitunet.data.nifti_io import nifti_case_id
from splitunet.errors import SplitUNetConfigError
from splitunet.evaluation.drift_treatments import DP_TREATMENTS, treatment_differences, treatment_markdown
from splitunet.evaluation.utility import REGIONS, _interval_cell, _mean_dice, paired_interval
from splitunet.networks.optimizer import OPTIMIZER_NAME
from splitunet.server.cases import split_cases
from splitunet.u_shape.hospital_trainer import split_hospital_cases

__all__ = [
    "REGIONS",
    "TOPOLOGIES",
    "Topology",
    "CompareSettings",
    "CompareData",
    "prepare_compare_data",
    "choose_secret",
    "choose_cohort_secret",
    "run_compare",
    "summarise_compare",
    "compare_markdown",
    "curve_markdown",
]

# Names the vertical runner reads in its data folder (splitunet.tools.demo).
_MSD_SOURCE = "phantom_msd"
_PARTITION = "parties"
_SECRET_FILE = "case_key_secret.txt"
# The SplitFed rows' secret (each hospital's cohort holds out that hospital's cases), beside the vertical one.
_COHORT_SECRET_FILE = "case_key_secret_splitfed.txt"
_HOSPITALS_INDEX = "hospitals.json"
_RUN_FILE = "compare_run.json"
# Candidate secrets tried before giving up (a split of N cases holding out k is hit once in C(N, k) on average).
_MAX_SECRET_TRIES = 2_000_000


@dataclass(frozen=True)
class Topology:
    """One row of the comparison.

    Args:
        key: folder name and stable identifier (``split_unet_fp32``, ``fedavg``, ...).
        label: row name.
        kind: ``"vertical"``, ``"splitfed"``, ``"fedavg"``, ``"u_shape"`` or ``"centralized"``.
        job: the job under ``jobs/`` (``None`` for the centralized baseline, which runs in this process).
        options: kind-specific switches: ``fedprox`` (use the settings' ``fedprox_mu``: FedAvg's workflow, SplitFed's
            sites), ``dwcs`` (DWCS on, for the workflows that take ``drift_correction``; ``fedavg_unet_dwcs`` has it
            in the job itself), ``dp_epsilon`` (a DP job's ``target_epsilon``, its other DP settings the job's own).
    """

    key: str
    label: str
    kind: str
    job: str | None
    options: Mapping = field(default_factory=dict)


TOPOLOGIES: tuple[Topology, ...] = (
    Topology("split_unet_fp32", "vertical Split-U-Net, float32 (reference)", "vertical", "split_unet_fp32"),
    Topology("split_unet", "vertical Split-U-Net, int8 (the main job)", "vertical", "split_unet"),
    Topology(
        "split_unet_dp_eps3",
        "vertical Split-U-Net, int8 + DP-SGD on the encoders, target ε 3",
        "vertical",
        "split_unet_dp",
        {"dp_epsilon": 3.0},
    ),
    Topology("splitfed", "SplitFed, int8 (a site per modality and hospital)", "splitfed", "split_unet_splitfed"),
    Topology("splitfed_dwcs", "SplitFed, int8 + DWCS", "splitfed", "split_unet_splitfed", {"dwcs": True}),
    Topology("splitfed_fedprox", "SplitFed, int8 + FedProx", "splitfed", "split_unet_splitfed", {"fedprox": True}),
    Topology("fedavg", "horizontal FedAvg", "fedavg", "fedavg_unet"),
    Topology("fedprox", "horizontal FedAvg + FedProx", "fedavg", "fedavg_unet", {"fedprox": True}),
    Topology("fedavg_dwcs", "horizontal FedAvg + DWCS", "fedavg", "fedavg_unet_dwcs"),
    *(
        Topology(
            f"fedavg_dp_eps{epsilon}",
            f"horizontal FedAvg + DP-SGD, target ε {epsilon}",
            "fedavg",
            "fedavg_unet_dp",
            {"dp_epsilon": float(epsilon)},
        )
        for epsilon in (1, 3, 10)
    ),
    Topology("u_shape", "U-shape", "u_shape", "u_shape_unet"),
    Topology("u_shape_dwcs", "U-shape + DWCS", "u_shape", "u_shape_unet", {"dwcs": True}),
    Topology("centralized", "centralized (all patients pooled, no federation)", "centralized", None),
)
_BY_KEY = {topology.key: topology for topology in TOPOLOGIES}

# Settings every finished run's fingerprint has held since the first studies, and those it never holds. A field
# added to CompareSettings later enters the fingerprint only at a value other than its default: a study under way
# keeps reusing its finished runs (tests/evaluation/test_compare.py pins this on a run file of the first version).
_FINGERPRINT_FIELDS = (
    "hospitals",
    "cases_per_hospital",
    "val_cases_per_hospital",
    "shape",
    "steps",
    "rounds",
    "batch_size",
    "crop_size",
    "features",
    "learning_rate",
    "fedprox_mu",
)
_NOT_FINGERPRINTED = ("seeds", "topologies", "threads_per_party", "timeout_s")


@dataclass
class CompareSettings:
    """What the comparison trains and on which data.

    Args:
        hospitals: phantom hospitals (profiles of ``NON_IID_PROFILES`` in turn).
        cases_per_hospital: phantom cases of each hospital.
        val_cases_per_hospital: each hospital's held-out cases (the vertical job holds out their union).
        shape: phantom grid.
        steps: AdamW steps of every model.
        rounds: federated rounds of FedAvg and the U-shape, and SplitFed's encoder averages (must divide
            ``steps``); the vertical job has none.
        batch_size: crops per step (per hospital for FedAvg and the U-shape).
        crop_size: training crop, also the sliding window at validation.
        features: U-Net feature sizes of every topology.
        learning_rate: AdamW's, everywhere.
        fedprox_mu: FedProx's proximal weight of the ``fedprox`` and ``splitfed_fedprox`` rows (finite, >= 0).
        curve_every: also score every run on the held-out cases every this many steps (0: only at the end), so
            that each run records its learning curve and one study answers for every shorter budget on it (a
            multiple of ``steps / rounds`` that divides ``steps``). Scoring draws no random numbers and changes no
            weight, so a run's first ``n`` steps are a run of ``n`` steps (checked end to end, to 1e-6, on the
            seeded topologies at two hospitals; with more, FLARE's arrival-order sums make runs differ in rounding).
        seeds: paired seeds: phantom data, held-out split and training seed of every run of that seed.
        topologies: keys of :data:`TOPOLOGIES` to run, in row order (the first is the reference).
        threads_per_party: torch threads of each data holder.
        timeout_s: each simulator run's limit.
    """

    hospitals: int = 3
    cases_per_hospital: int = 8
    val_cases_per_hospital: int = 2
    # 48³ phantoms and 32³ crops: a centralized probe (seed 0) reached mean Dice 0.90 at 300 steps and 0.89 at 600,
    # against 0.59 at 150, so 400 steps are past the swing; at 64³ and 48³ crops the study would not fit a session.
    shape: Sequence[int] = (48, 48, 48)
    steps: int = 400
    rounds: int = 10
    batch_size: int = 2
    crop_size: Sequence[int] = (32, 32, 32)
    features: Sequence[int] = (8, 16, 32, 64, 128, 8)
    learning_rate: float = 2e-3
    fedprox_mu: float = 0.01
    curve_every: int = 0
    seeds: Sequence[int] = (0, 1, 2)
    topologies: Sequence[str] = tuple(topology.key for topology in TOPOLOGIES)
    threads_per_party: int = 1
    timeout_s: float = 3600.0

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        self.crop_size = tuple(int(s) for s in self.crop_size)
        self.features = tuple(int(f) for f in self.features)
        self.seeds = tuple(int(s) for s in self.seeds)
        self.topologies = tuple(self.topologies)
        unknown = [key for key in self.topologies if key not in _BY_KEY]
        if unknown or not self.topologies:
            raise SplitUNetConfigError(f"unknown topologies {unknown}; known: {list(_BY_KEY)}")
        for name in ("hospitals", "cases_per_hospital", "val_cases_per_hospital", "steps", "rounds", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SplitUNetConfigError(f"{name} must be an int >= 1, got {value!r}")
        if self.val_cases_per_hospital >= self.cases_per_hospital:
            raise SplitUNetConfigError("every hospital must keep at least one case to train on")
        if self.steps % self.rounds:
            raise SplitUNetConfigError(f"rounds ({self.rounds}) must divide steps ({self.steps})")
        if not self.seeds:
            raise SplitUNetConfigError("at least one seed")
        every = self.curve_every
        if not isinstance(every, int) or isinstance(every, bool) or every < 0:
            raise SplitUNetConfigError(f"curve_every must be an int >= 0, got {every!r}")
        if every and (self.steps % every or every % self.local_steps):
            raise SplitUNetConfigError(
                f"curve_every ({every}) must divide steps ({self.steps}) and be a multiple of the "
                f"{self.local_steps} steps of a round (the round-based topologies score between rounds)"
            )
        mu = self.fedprox_mu
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or mu < 0:
            raise SplitUNetConfigError(f"fedprox_mu must be a finite number >= 0, got {mu!r}")
        if self.hospitals < 2 and any(_BY_KEY[key].kind == "splitfed" for key in self.topologies):
            raise SplitUNetConfigError("SplitFed needs at least two hospitals: one has one site per modality")

    @classmethod
    def quick(cls, **overrides) -> CompareSettings:
        """The tiny configuration (tests, seconds a run): its figures mean nothing."""
        values = {
            "hospitals": 2,
            "cases_per_hospital": 3,
            "val_cases_per_hospital": 1,
            "shape": (32, 32, 32),
            "steps": 4,
            "rounds": 2,
            "batch_size": 1,
            "crop_size": (32, 32, 32),
            "features": (4, 8, 8, 16, 16, 4),
            "seeds": (0,),
            "timeout_s": 600.0,
        }
        values.update(overrides)
        return cls(**values)

    @property
    def local_steps(self) -> int:
        """AdamW steps per round of FedAvg and the U-shape."""
        return self.steps // self.rounds

    @property
    def curve_steps(self) -> list[int]:
        """The steps at which every run is scored: each multiple of ``curve_every``, and the end."""
        if not self.curve_every:
            return [self.steps]
        return list(range(self.curve_every, self.steps + 1, self.curve_every))

    @property
    def hospital_names(self) -> list[str]:
        """The hospitals' client and folder names, as the horizontal and U-shape runners name them."""
        return [f"hospital-{index + 1}" for index in range(self.hospitals)]

    def fingerprint(self) -> dict:
        """What a finished run was measured under (seeds and row choice aside): a rerun reuses it only if equal.

        The settings of the first studies always; a setting added since only where it differs from its default, so
        that adding one does not change the fingerprint of the runs already finished.
        """
        values = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.name in _NOT_FINGERPRINTED:
                continue
            if item.name in _FINGERPRINT_FIELDS or value != _field_default(item):
                values[item.name] = value
        # Not a setting but the code's: runs trained under Adam's coupled decay recorded none and are not reused.
        values["optimizer"] = OPTIMIZER_NAME
        return json.loads(json.dumps(values))


def _field_default(item: dataclasses.Field):
    """A settings field's default, as ``__post_init__`` normalises it (tuples stay tuples)."""
    if item.default is not dataclasses.MISSING:
        return item.default
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return dataclasses.MISSING


# ---------------------------------------------------------------------------------------------------------- data


@dataclass
class CompareData:
    """One seed's data: the hospitals, the vertical job's union source, the shared held-out cases.

    Attributes:
        data_dir: ``<out>/data_seed<s>``; the vertical runner's ``data_dir`` and the hospitals' parent.
        hospitals: hospital name -> its MSD folder.
        cases: hospital name -> its case IDs, sorted.
        held_out: hospital name -> its held-out case IDs, sorted.
        secret: the case-key secret the vertical parties share (chosen so that they hold out the same cases).
        cohort_secret: the SplitFed parties' secret (chosen so that each hospital's cohort holds out that hospital's
            cases); ``None`` when no SplitFed row is run.
    """

    data_dir: Path
    hospitals: dict[str, Path]
    cases: dict[str, list[str]]
    held_out: dict[str, list[str]]
    secret: str
    cohort_secret: str | None = None

    @property
    def all_held_out(self) -> list[str]:
        """Every held-out case ID, sorted."""
        return sorted(case for cases in self.held_out.values() for case in cases)

    def held_out_keys(self, secret: str | None = None) -> list[str]:
        """The held-out cases' keys under ``secret`` (default the vertical one), as a split server records them."""
        return sorted(case_key(case, secret or self.secret) for case in self.all_held_out)


def _case_ids(folder: Path) -> list[str]:
    index = json.loads((folder / "dataset.json").read_text())
    return sorted(nifti_case_id(folder / entry["image"]) for entry in index["training"])


def _hospitals_match(data_dir: Path, settings: CompareSettings, seed: int) -> bool:
    index = data_dir / _HOSPITALS_INDEX
    if not index.is_file():
        return False
    content = json.loads(index.read_text())
    hospitals = content.get("hospitals", [])
    return (
        content.get("seed") == seed
        and content.get("shape") == list(settings.shape)
        and [entry.get("name") for entry in hospitals] == settings.hospital_names
        and all(entry.get("num_cases") == settings.cases_per_hospital for entry in hospitals)
        and all((data_dir / name / "dataset.json").is_file() for name in settings.hospital_names)
    )


def _write_union_source(data_dir: Path, hospitals: Mapping[str, Path]) -> Path:
    """``data_dir/phantom_msd``: an MSD index over every hospital's files (by relative path, no copy)."""
    source = data_dir / _MSD_SOURCE
    source.mkdir(parents=True, exist_ok=True)
    first = json.loads((next(iter(hospitals.values())) / "dataset.json").read_text())
    training = []
    for name, folder in hospitals.items():
        for entry in json.loads((folder / "dataset.json").read_text())["training"]:
            training.append(
                {
                    "image": (Path("..") / name / entry["image"]).as_posix(),
                    "label": (Path("..") / name / entry["label"]).as_posix(),
                }
            )
    index = {
        **{key: value for key, value in first.items() if key not in ("training", "numTraining", "phantom")},
        "description": "the union of the comparison's phantom hospitals (" + ", ".join(hospitals) + ")",
        "numTraining": len(training),
        "training": training,
    }
    write_json_atomic(index, source / "dataset.json")
    return source


def _vertical_held_out(case_ids: Sequence[str], secret: str, num_val: int, seed: int) -> set[str]:
    """The case IDs a split server holds out of ``case_ids`` (its rule: ``split_cases`` over the sorted keys).

    The vertical controller applies it to every case; the SplitFed controller to each cohort's cases.
    """
    key_to_case = {case_key(case, secret): case for case in case_ids}
    _, val_keys = split_cases(sorted(key_to_case), num_val, seed)
    return {key_to_case[key] for key in val_keys}


def _search_secret(
    constraints: Sequence[tuple[Sequence[str], Sequence[str]]], seed: int, salt: str, max_tries: int
) -> str | None:
    """The first candidate secret under which each ``(case IDs, held out)`` pair's split holds out exactly those.

    Candidates are ``sha256("<salt>/<seed>/<i>")`` for ``i = 0, 1, ...``, so the choice is reproducible. Each pair
    is checked by ``split_cases``' own rule, unrolled: the held-out keys are those at the seeded permutation's first
    positions of the sorted keys; a pair that fails ends the candidate.
    """
    prepared = []
    for case_ids, held_out in constraints:
        case_ids, target = sorted(case_ids), set(held_out)
        if not target or not target <= set(case_ids) or len(target) >= len(case_ids):
            raise SplitUNetConfigError("the held-out cases must be a non-empty proper subset of the cases")
        positions = np.random.default_rng(seed).permutation(len(case_ids))[: len(target)]
        prepared.append((case_ids, [case.encode("utf-8") for case in case_ids], positions, target))
    for attempt in range(max_tries):
        secret = hashlib.sha256(f"{salt}/{seed}/{attempt}".encode()).hexdigest()[:32]
        key = secret.encode("utf-8")
        for case_ids, names, positions, target in prepared:
            # case_key's order (its hex prefix sorts as these bytes), by the one-shot C HMAC: ~10x faster.
            ranked = sorted((hmac.digest(key, name, "sha256")[:16], case) for name, case in zip(names, case_ids))
            if {ranked[p][1] for p in positions} != target:
                break
        else:
            # Confirmed by the rule itself, keys and all.
            if all(
                _vertical_held_out(case_ids, secret, len(target), seed) == target for case_ids, _, _, target in prepared
            ):
                return secret
    return None


def choose_secret(
    case_ids: Sequence[str], held_out: Sequence[str], seed: int, max_tries: int = _MAX_SECRET_TRIES
) -> str:
    """A case-key secret under which the vertical controller (split seed ``seed``) holds out exactly ``held_out``.

    Candidates are ``sha256("splitunet-compare/<seed>/<i>")`` for ``i = 0, 1, ...``, so the choice is reproducible.

    Raises:
        SplitUNetConfigError: none of ``max_tries`` candidates fits (hold out fewer cases).
    """
    secret = _search_secret([(case_ids, held_out)], seed, "splitunet-compare", max_tries)
    if secret is None:
        raise SplitUNetConfigError(
            f"no secret in {max_tries} tries holds out {len(set(held_out))} of {len(case_ids)} cases as the "
            "hospitals do; hold out fewer cases per hospital"
        )
    return secret


def choose_cohort_secret(
    cases: Mapping[str, Sequence[str]],
    held_out: Mapping[str, Sequence[str]],
    seed: int,
    max_tries: int = _MAX_SECRET_TRIES,
) -> str:
    """A case-key secret under which every cohort of the SplitFed controller holds out exactly its given cases.

    The controller splits each cohort's own sorted keys with the run's seed (``CohortMatch.split``), so one secret
    must satisfy every cohort at once: about one candidate in the product of ``C(n_c, k_c)`` does. Candidates are
    ``sha256("splitunet-compare/cohorts/<seed>/<i>")``, so the choice is reproducible.

    Args:
        cases: cohort (hospital) -> its case IDs.
        held_out: cohort -> the case IDs it must hold out (a non-empty proper subset of its cases).
        seed: the run's split seed.
        max_tries: candidates tried before giving up.

    Raises:
        SplitUNetConfigError: the cohorts of ``cases`` and ``held_out`` differ, a held-out set is not a non-empty
            proper subset of its cohort's cases, or none of ``max_tries`` candidates fits (hold out fewer cases).
    """
    if set(cases) != set(held_out) or not cases:
        raise SplitUNetConfigError(f"held-out cases for cohorts {sorted(held_out)}, cases of cohorts {sorted(cases)}")
    constraints = [(cases[name], held_out[name]) for name in sorted(cases)]
    secret = _search_secret(constraints, seed, "splitunet-compare/cohorts", max_tries)
    if secret is None:
        raise SplitUNetConfigError(
            f"no secret in {max_tries} tries makes {len(cases)} cohorts hold out their hospitals' cases; hold out "
            "fewer cases per hospital"
        )
    return secret


def _cohort_held_out(cases: Mapping[str, Sequence[str]], secret: str, num_val: int, seed: int) -> dict[str, set[str]]:
    """The case IDs each cohort of the SplitFed controller holds out under ``secret``."""
    return {name: _vertical_held_out(ids, secret, num_val, seed) for name, ids in cases.items()}


def prepare_compare_data(data_dir: str | Path, settings: CompareSettings, seed: int) -> CompareData:
    """Generate (or reuse, if made with the same settings) one seed's hospitals, the vertical job's union source,
    the shared held-out split, the secret that makes the vertical job hold out the same cases and, with a SplitFed
    row, the one that makes each hospital's cohort hold out that hospital's cases."""
    data_dir = Path(data_dir).resolve()
    if not _hospitals_match(data_dir, settings, seed):
        # Stale data of other settings would silently change what is measured: start over, partition included.
        if data_dir.exists():
            shutil.rmtree(data_dir)
        profiles = [
            dataclasses.replace(NON_IID_PROFILES[index % len(NON_IID_PROFILES)], name=name)
            for index, name in enumerate(settings.hospital_names)
        ]
        generate_hospitals(data_dir, profiles, settings.cases_per_hospital, settings.shape, seed, progress=False)
    hospitals = {name: data_dir / name for name in settings.hospital_names}
    cases = {name: _case_ids(folder) for name, folder in hospitals.items()}
    held_out = {}
    for name, ids in cases.items():
        # FedAvg's rule and the U-shape's: the same permutation of the sorted IDs (checked, not assumed).
        _, fedavg_val = split_cases(ids, settings.val_cases_per_hospital, seed)
        _, u_shape_val = split_hospital_cases(ids, settings.val_cases_per_hospital, seed, party=name)
        if fedavg_val != u_shape_val:
            raise SplitUNetConfigError(f"{name}: FedAvg and the U-shape would hold out different cases")
        held_out[name] = fedavg_val
    every_case = sorted(case for ids in cases.values() for case in ids)
    target = sorted(case for ids in held_out.values() for case in ids)
    secret_file = data_dir / _SECRET_FILE
    secret = secret_file.read_text().strip() if secret_file.is_file() else ""
    if not secret or _vertical_held_out(every_case, secret, len(target), seed) != set(target):
        secret = choose_secret(every_case, target, seed)
        write_text_atomic(secret, secret_file, mode=0o600)
    cohort_secret = None
    if any(_BY_KEY[key].kind == "splitfed" for key in settings.topologies):
        cohort_file = data_dir / _COHORT_SECRET_FILE
        cohort_secret = cohort_file.read_text().strip() if cohort_file.is_file() else ""
        wanted = {name: set(ids) for name, ids in held_out.items()}
        if not cohort_secret or _cohort_held_out(cases, cohort_secret, settings.val_cases_per_hospital, seed) != wanted:
            cohort_secret = choose_cohort_secret(cases, held_out, seed)
            write_text_atomic(cohort_secret, cohort_file, mode=0o600)
    if not (data_dir / _MSD_SOURCE / "dataset.json").is_file():
        _write_union_source(data_dir, hospitals)
    return CompareData(data_dir, hospitals, cases, held_out, secret, cohort_secret)


# ---------------------------------------------------------------------------------------------------------- runs


def _fedavg_upload_bytes(settings: CompareSettings) -> float:
    """FedAvg's upload per iteration: every hospital sends its float32 state once a round (FLARE's DXO of NumPy
    arrays, serialisation headers aside), over the round's local steps."""
    from splitunet.horizontal.model import FedAvgUNet, state_to_numpy

    model = FedAvgUNet(features=settings.features, seed=0)
    state_bytes = sum(int(array.nbytes) for array in state_to_numpy(model).values())
    return settings.hospitals * state_bytes / settings.local_steps


def _dp_settings(topology: Topology) -> dict | None:
    """A DP row's ``dp`` executor entry: its job's own, at the row's ``target_epsilon`` (``None`` for other rows)."""
    epsilon = topology.options.get("dp_epsilon")
    if epsilon is None:
        return None
    from splitunet.tools.deployment import find_job

    config = json.loads((find_job(topology.job) / "app" / "config" / "config_fed_client.json").read_text())
    shipped = config["executors"][0]["executor"]["args"].get("dp")
    if not shipped:
        raise SplitUNetConfigError(f"{topology.key}: job {topology.job} trains without DP-SGD")
    dp = {key: value for key, value in shipped.items() if key != "noise_multiplier"}
    return {**dp, "target_epsilon": float(epsilon)}


def _row_fingerprint(topology: Topology, settings: CompareSettings) -> dict:
    """What a row's run depends on beyond :meth:`CompareSettings.fingerprint`: a DP row's DP settings (empty for the
    other rows, whose finished runs carry none)."""
    dp = _dp_settings(topology)
    if dp is None:
        return {}
    return {"dp": dp, "dp_steps": settings.steps} if topology.kind == "vertical" else {"dp": dp}


def _dp_figures(topology: Topology, records: Mapping[str, Mapping], run_dir: Path) -> dict:
    """The epsilon a DP run spent: per data holder, and the largest (epsilon is per holder: no average means
    anything), at that holder's delta.

    Raises:
        SplitUNetConfigError: a holder of a DP row reported no epsilon.
    """
    if not records or any(record.get("epsilon") is None for record in records.values()):
        raise SplitUNetConfigError(f"{topology.key}: not every data holder reported its epsilon; see {run_dir}")
    spent = {
        party: {"epsilon": float(record["epsilon"]), "delta": float(record["delta"])}
        for party, record in sorted(records.items())
    }
    worst = max(spent, key=lambda party: spent[party]["epsilon"])
    return {"epsilon": spent[worst]["epsilon"], "delta": spent[worst]["delta"], "dp": spent}


def _curve_point(iteration: int, dice: Mapping) -> dict:
    return {"iteration": int(iteration), "dice": {region: float(dice[region]) for region in REGIONS}}


def _checked_curve(topology: Topology, curve: Sequence[Mapping], settings: CompareSettings, run_dir: Path) -> list:
    """The run's learning curve if it was scored at exactly the settings' curve steps (a curve with a gap would
    pass a shorter budget off as measured)."""
    curve = sorted(curve, key=lambda point: point["iteration"])
    if [point["iteration"] for point in curve] != settings.curve_steps:
        raise SplitUNetConfigError(
            f"{topology.key}: scored at steps {[point['iteration'] for point in curve]}, not at "
            f"{settings.curve_steps}; see {run_dir}"
        )
    return curve


def _split_curve(topology: Topology, summary: Mapping, settings: CompareSettings, run_dir: Path) -> list:
    """A split server's validations (vertical, SplitFed): it scores every ``val_every`` iterations and at the end."""
    history = summary.get("history") or []
    curve = [_curve_point(entry["iteration"], entry["dice"]) for entry in history]
    return _checked_curve(topology, curve, settings, run_dir)


def _pooled_curve(
    topology: Topology,
    history: Sequence[tuple[int, Mapping[str, Mapping]]],
    held_out: Mapping[str, Sequence[str]],
    settings: CompareSettings,
    run_dir: Path,
) -> list:
    """Hospitals' validations (FedAvg, U-shape) pooled at each step: each hospital's Dice is a mean over its own
    held-out cases, so the mean weighted by their counts is the mean over every held-out case (``pooled_scores``)."""
    from splitunet.horizontal.demo import pooled_scores

    curve = []
    for iteration, by_hospital in history:
        if set(by_hospital) != set(held_out):
            raise SplitUNetConfigError(
                f"{topology.key}: at step {iteration} scores from {sorted(by_hospital)}, not every hospital; see "
                f"{run_dir}"
            )
        hospitals = {name: {"dice": dice, "val_cases": len(held_out[name])} for name, dice in by_hospital.items()}
        curve.append(_curve_point(iteration, pooled_scores(hospitals)))
    return _checked_curve(topology, curve, settings, run_dir)


def _split_server_args(settings: CompareSettings, seed: int, num_val_cases: int) -> dict:
    """The split workflow's arguments every vertical row shares: the study's budget, model and seed."""
    return {
        "num_iterations": settings.steps,
        "val_every": settings.curve_every or settings.steps,
        "batch_size": settings.batch_size,
        "crop_size": list(settings.crop_size),
        "features": list(settings.features),
        "learning_rate": settings.learning_rate,
        "num_val_cases": num_val_cases,
        "seed": seed,
    }


def _run_vertical(topology: Topology, run_dir: Path, data: CompareData, settings: CompareSettings, seed: int) -> dict:
    from splitunet.tools.demo import DemoSettings, run_demo
    from splitunet.tools.deployment import find_job

    server_args = _split_server_args(settings, seed, num_val_cases=len(data.all_held_out))
    dp = _dp_settings(topology)
    # A DP site projects its epsilon for dp_steps and refuses a step beyond them: the study's budget.
    client_args = {} if dp is None else {"dp": dp, "dp_steps": settings.steps}
    summary = run_demo(
        run_dir,
        DemoSettings(
            cases=sum(len(ids) for ids in data.cases.values()),
            shape=settings.shape,
            seed=seed,
            server_args=server_args,
            client_args=client_args,
            threads_per_party=settings.threads_per_party,
            timeout_s=settings.timeout_s,
        ),
        job_dir=find_job(topology.job),
        data_dir=data.data_dir,
    )
    recorded = json.loads(Path(summary["server_results"]).read_text()).get("val_cases")
    if sorted(recorded or []) != data.held_out_keys():
        raise SplitUNetConfigError(
            f"{topology.key}: the vertical server held out other cases than the hospitals; see {run_dir}"
        )
    figures = {
        "dice": summary["dice"],
        "hd95": summary.get("hd95"),
        "iterations": summary["iterations"],
        "rounds": None,
        "upload_bytes_per_iteration": summary.get("activation_bytes_per_iteration"),
        "elapsed_s": summary.get("elapsed_s"),
        "held_out": data.all_held_out,
    }
    if settings.curve_every:
        figures["curve"] = _split_curve(topology, summary, settings, run_dir)
    if dp is not None:
        figures.update(_dp_figures(topology, _site_dp_records(run_dir, summary), run_dir))
    return figures


def _site_dp_records(run_dir: Path, summary: Mapping) -> dict[str, dict]:
    """Each vertical site's DP record, from the ``results.json`` in its own run folder (the server collects none)."""
    from splitunet.tools.simulator import find_run_file

    records = {}
    for site in summary.get("sites") or {}:
        path = find_run_file(run_dir / "simulator", site, "results.json")
        records[site] = (json.loads(path.read_text()).get("dp") or {}) if path else {}
    return records


def _check_cohorts(topology: Topology, summary: Mapping, data: CompareData, run_dir: Path) -> None:
    """The SplitFed server held out each hospital's cases, and no others, in that hospital's cohort."""
    from splitunet.data.site_groups import group_sites

    recorded = json.loads(Path(summary["server_results"]).read_text()).get("val_cases")
    if sorted(recorded or []) != data.held_out_keys(data.cohort_secret):
        raise SplitUNetConfigError(
            f"{topology.key}: the SplitFed server held out other cases than the hospitals; see {run_dir}"
        )
    names = list(data.cases)
    sites_of = {name: set() for name in names}
    for site, (_, group) in group_sites(len(names)).items():
        sites_of[names[group]].add(site)
    counts = {frozenset(cohort["sites"]): cohort for cohort in summary.get("cohorts") or []}
    for name in names:
        cohort = counts.get(frozenset(sites_of[name]), {})
        val = len(data.held_out[name])
        if (cohort.get("train_cases"), cohort.get("val_cases")) != (len(data.cases[name]) - val, val):
            raise SplitUNetConfigError(f"{topology.key}: {name}'s cohort is not that hospital's cases; see {run_dir}")


def _run_splitfed(topology: Topology, run_dir: Path, data: CompareData, settings: CompareSettings, seed: int) -> dict:
    """SplitFed: each hospital's patients are one cohort of four sites (``site-1``.. for ``hospital-1``, ...)."""
    from splitunet.tools.deployment import find_job
    from splitunet.tools.splitfed_demo import SplitFedDemoSettings, run_splitfed_demo

    server_args = {
        **_split_server_args(settings, seed, num_val_cases=settings.val_cases_per_hospital),
        "encoder_averaging_every": settings.local_steps,
        "drift_correction": {} if topology.options.get("dwcs") else None,
        "fedprox_mu": settings.fedprox_mu if topology.options.get("fedprox") else 0.0,
    }
    summary = run_splitfed_demo(
        run_dir,
        SplitFedDemoSettings(
            sites_per_modality=settings.hospitals,
            cases=sum(len(ids) for ids in data.cases.values()),
            shape=settings.shape,
            seed=seed,
            # Group g (sites site-4g+1 .. site-4g+4) is the g-th hospital: _check_cohorts relies on that order.
            groups=list(data.cases.values()),
            server_args=server_args,
            threads_per_party=settings.threads_per_party,
            timeout_s=settings.timeout_s,
        ),
        job_dir=find_job(topology.job),
        data_dir=data.data_dir,
        secret_file=data.data_dir / _COHORT_SECRET_FILE,
    )
    _check_cohorts(topology, summary, data, run_dir)
    averaging = summary.get("encoder_averaging") or {}
    activations = summary.get("activation_bytes_per_iteration")
    weights = averaging.get("upload_bytes_per_round", 0) * averaging.get("rounds", 0)
    figures = {
        "dice": summary["dice"],
        "hd95": summary.get("hd95"),
        "iterations": summary["iterations"],
        "rounds": averaging.get("rounds"),
        "upload_bytes_per_iteration": activations + weights / summary["iterations"] if activations else None,
        "elapsed_s": summary.get("elapsed_s"),
        "held_out": data.all_held_out,
    }
    if settings.curve_every:
        figures["curve"] = _split_curve(topology, summary, settings, run_dir)
    return figures


def _check_hospital_counts(topology: Topology, hospitals: Mapping[str, Mapping], data: CompareData) -> None:
    for name, cases in data.held_out.items():
        if hospitals.get(name, {}).get("val_cases") != len(cases):
            raise SplitUNetConfigError(
                f"{topology.key}: {name} held out other cases than the split chosen for the study"
            )


def _sized_fedavg_job(job: str, out_dir: Path, server_args: Mapping, dp: Mapping | None = None) -> Path:
    """A copy of a FedAvg job with ``server_args`` set on its training workflow (the first) and, for a DP row, ``dp``
    as its hospitals' DP settings.

    ``run_fedavg_demo`` sets its server arguments on workflows whose class path ends in ``.FedAvg``, which leaves
    out FLARE's FedAvg under another name (``splitunet.horizontal.DriftCorrectedFedAvg``); sizing the copy here works
    for either, and the run's rounds are checked afterwards.
    """
    from splitunet.tools.deployment import find_job

    source = find_job(job)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(source, out_dir)
    path = out_dir / "app" / "config" / "config_fed_server.json"
    config = json.loads(path.read_text())
    config["workflows"][0].setdefault("args", {}).update(server_args)
    write_json_atomic(config, path)
    if dp is not None:
        # The whole entry: the demo's client arguments replace an executor argument, they do not merge into it.
        path = out_dir / "app" / "config" / "config_fed_client.json"
        config = json.loads(path.read_text())
        config["executors"][0]["executor"]["args"]["dp"] = dict(dp)
        write_json_atomic(config, path)
    return out_dir


def _run_fedavg(topology: Topology, run_dir: Path, data: CompareData, settings: CompareSettings, seed: int) -> dict:
    from splitunet.horizontal.demo import FedAvgDemoSettings, run_fedavg_demo

    features = list(settings.features)
    server_args = {
        "num_rounds": settings.rounds,
        "fedprox_mu": settings.fedprox_mu if topology.options.get("fedprox") else 0.0,
    }
    summary = run_fedavg_demo(
        run_dir,
        FedAvgDemoSettings(
            hospitals=settings.hospitals,
            cases=settings.cases_per_hospital,
            shape=settings.shape,
            seed=seed,
            server_args=server_args,
            client_args={
                "local_iterations": settings.local_steps,
                # In rounds: a hospital scores the global model it receives at the start of every such round.
                "val_every": settings.curve_every // settings.local_steps,
                "batch_size": settings.batch_size,
                "crop_size": list(settings.crop_size),
                "features": features,
                "learning_rate": settings.learning_rate,
                "num_val_cases": settings.val_cases_per_hospital,
                "seed": seed,
            },
            model_args={"features": features, "seed": seed},
            threads_per_hospital=settings.threads_per_party,
            timeout_s=settings.timeout_s,
        ),
        job_dir=_sized_fedavg_job(
            topology.job, run_dir / "job_source" / topology.job, server_args, _dp_settings(topology)
        ),
        data_dir=data.data_dir,
    )
    _check_hospital_counts(topology, summary["hospitals"], data)
    if (summary["rounds"], summary["iterations"]) != (settings.rounds, settings.steps):
        raise SplitUNetConfigError(
            f"{topology.key}: ran {summary['rounds']} rounds, {summary['iterations']} steps instead of "
            f"{settings.rounds}, {settings.steps}; see {run_dir}"
        )
    figures = {
        "dice": summary["dice"],
        "hd95": summary.get("hd95"),
        "iterations": summary["iterations"],
        "rounds": summary["rounds"],
        "upload_bytes_per_iteration": _fedavg_upload_bytes(settings),
        "elapsed_s": summary.get("elapsed_s"),
        "held_out": data.all_held_out,
    }
    if settings.curve_every:
        figures["curve"] = _fedavg_curve(topology, summary, data, settings, run_dir)
    if "dp_epsilon" in topology.options:
        records = summary.get("dp") or {}
        figures.update(_dp_figures(topology, {name: records.get(name, {}) for name in data.held_out}, run_dir))
    return figures


def _fedavg_curve(
    topology: Topology, summary: Mapping, data: CompareData, settings: CompareSettings, run_dir: Path
) -> list:
    """FedAvg's curve: the global model each hospital scored at the start of a round (the average after that many
    rounds), and the final global model's scores at the end."""
    by_step: dict[int, dict[str, Mapping]] = {}
    for name, hospital in summary["hospitals"].items():
        for entry in hospital.get("history") or []:
            by_step.setdefault(int(entry["iterations"]), {})[name] = entry["dice"]
        by_step.setdefault(settings.steps, {})[name] = hospital["dice"]
    return _pooled_curve(topology, sorted(by_step.items()), data.held_out, settings, run_dir)


def _run_u_shape(topology: Topology, run_dir: Path, data: CompareData, settings: CompareSettings, seed: int) -> dict:
    from splitunet.tools.deployment import find_job
    from splitunet.u_shape.demo import UShapeDemoSettings, run_u_shape_demo

    summary = run_u_shape_demo(
        run_dir,
        UShapeDemoSettings(
            hospitals=settings.hospitals,
            cases=settings.cases_per_hospital,
            shape=settings.shape,
            seed=seed,
            server_args={
                "num_rounds": settings.rounds,
                "iterations_per_round": settings.local_steps,
                "val_every": settings.curve_every // settings.local_steps or settings.rounds,
                "batch_size": settings.batch_size,
                "crop_size": list(settings.crop_size),
                "features": list(settings.features),
                "learning_rate": settings.learning_rate,
                "num_val_cases": settings.val_cases_per_hospital,
                "drift_correction": {} if topology.options.get("dwcs") else None,
                "seed": seed,
            },
            threads_per_hospital=settings.threads_per_party,
            timeout_s=settings.timeout_s,
        ),
        data_dir=data.data_dir,
        job_dir=find_job(topology.job),
    )
    _check_hospital_counts(topology, summary["hospitals"], data)
    wire = summary.get("wire_bytes_per_iteration") or {}
    figures = {
        "dice": summary["dice"],
        "hd95": summary.get("hd95"),
        "iterations": summary["iterations"],
        "rounds": summary["rounds"],
        "upload_bytes_per_iteration": wire.get("up"),
        "elapsed_s": summary.get("elapsed_s"),
        "held_out": data.all_held_out,
    }
    if settings.curve_every:
        history = [(int(entry["iteration"]), entry["dice"]) for entry in summary.get("history") or []]
        figures["curve"] = _pooled_curve(topology, history, data.held_out, settings, run_dir)
    return figures


def _run_centralized(
    topology: Topology, run_dir: Path, data: CompareData, settings: CompareSettings, seed: int
) -> dict:
    """The upper reference: the same full U-Net as FedAvg's, trained in this process on every hospital's training
    cases pooled (the union source), ``steps`` AdamW steps, and scored on the same held-out cases."""
    from splitunet.compute.devices import configure_threads
    from splitunet.data.hospital_folder import HospitalFolder
    from splitunet.horizontal.local_trainer import LocalSettings, LocalTrainer

    configure_threads(settings.threads_per_party)
    started = time.perf_counter()
    folder = HospitalFolder(data.data_dir / _MSD_SOURCE, "msd", party="centralized")
    local = LocalSettings(
        features=list(settings.features),
        batch_size=settings.batch_size,
        crop_size=list(settings.crop_size),
        learning_rate=settings.learning_rate,
        num_val_cases=len(data.all_held_out),
        seed=seed,
    )
    trainer = LocalTrainer(folder, local, held_out=data.all_held_out)
    curve, done = [], 0
    for step in settings.curve_steps:
        # Chunks of one continuous run: the optimiser and the crop sampler carry on, scoring draws nothing.
        trainer.train_round(None, step - done)
        done = step
        dice, hd95 = trainer.score()
        curve.append(_curve_point(step, dice))
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = {"dice": dice, "hd95": hd95, "train_cases": len(trainer.train_cases), "val_cases": trainer.val_cases}
    write_json_atomic(summary, run_dir / "results.json")
    figures = {
        "dice": dice,
        "hd95": hd95,
        "iterations": settings.steps,
        "rounds": None,
        "upload_bytes_per_iteration": None,
        "elapsed_s": round(time.perf_counter() - started, 1),
        "held_out": data.all_held_out,
    }
    if settings.curve_every:
        figures["curve"] = curve
    return figures


_RUNNERS = {
    "vertical": _run_vertical,
    "splitfed": _run_splitfed,
    "fedavg": _run_fedavg,
    "u_shape": _run_u_shape,
    "centralized": _run_centralized,
}


def _finished(run_dir: Path, settings: CompareSettings, topology: Topology | None = None) -> dict | None:
    """The finished run in ``run_dir`` if it was measured under these settings (and, for a DP row, the same DP
    settings), else ``None``."""
    path = run_dir / _RUN_FILE
    if not path.is_file():
        return None
    run = json.loads(path.read_text())
    row = _row_fingerprint(topology, settings) if topology is not None else {}
    # Runs of rows without row settings never recorded any: their files stay valid as they are.
    return run if run.get("settings") == settings.fingerprint() and run.get("row_settings", {}) == row else None


def _restore_runs(reuse: str | Path, out_dir: Path, seed: int, held_out: Mapping[str, Sequence[str]]) -> None:
    """Write the run records of an earlier ``compare.json`` for ``seed`` where this study has none yet; each is
    then reused only if :func:`_finished` accepts it (the same settings and row settings)."""
    try:
        earlier = json.loads(Path(reuse).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SplitUNetConfigError(f"{reuse}: cannot be read as an earlier compare.json ({error})") from error
    recorded = earlier.get("held_out", {}).get(str(seed))
    runs = {key: by_seed[str(seed)] for key, by_seed in earlier.get("runs", {}).items() if str(seed) in by_seed}
    if not runs:
        return
    if recorded is not None and {name: sorted(ids) for name, ids in recorded.items()} != {
        name: sorted(ids) for name, ids in held_out.items()
    }:
        raise SplitUNetConfigError(
            f"{reuse}: seed {seed} held out other cases than this study's data does; its runs cannot be reused"
        )
    for key, run in runs.items():
        path = out_dir / f"seed{seed}" / key / _RUN_FILE
        if not path.is_file():
            write_json_atomic(run, path)


def run_compare(
    out_dir: str | Path,
    settings: CompareSettings | None = None,
    reuse: str | Path | Sequence[str | Path] | None = None,
) -> dict:
    """Train every topology of ``settings`` under every seed; write ``compare.json`` and ``compare.md``.

    Args:
        out_dir: the study's folder (one data folder per seed, one workspace per run, the tables).
        settings: sizes, budget, seeds and rows (default :class:`CompareSettings`; ``CompareSettings.quick()``
            for a test).
        reuse: earlier ``compare.json`` files (one or several) whose runs are taken over where they were measured
            under the same settings (the data, held-out cases and secrets derive from the seed, so a study continues
            on another machine, and parts run on several machines merge); where two files hold the same run, the
            first gives it, and a run already in ``out_dir`` is kept.

    Returns:
        the summary written to ``compare.json`` (see :func:`summarise_compare`).
    """
    settings = settings or CompareSettings()
    started = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    topologies = [_BY_KEY[key] for key in settings.topologies]
    reuse_files = [] if reuse is None else [reuse] if isinstance(reuse, (str, Path)) else list(reuse)
    runs: dict[str, dict[int, dict]] = {topology.key: {} for topology in topologies}
    held_out: dict[int, dict[str, list[str]]] = {}
    for seed in settings.seeds:
        data = prepare_compare_data(out_dir / f"data_seed{seed}", settings, seed)
        held_out[seed] = data.held_out
        for earlier in reuse_files:
            _restore_runs(earlier, out_dir, seed, data.held_out)
        for topology in topologies:
            run_dir = out_dir / f"seed{seed}" / topology.key
            run = _finished(run_dir, settings, topology)
            if run is None:
                where = topology.job or "in this process"
                print(f"\n=== seed {seed}: {topology.label} ({where}), {settings.steps} steps ===", flush=True)
                figures = _RUNNERS[topology.kind](topology, run_dir, data, settings, seed)
                run = {"settings": settings.fingerprint(), "seed": seed, "topology": topology.key, **figures}
                row = _row_fingerprint(topology, settings)
                if row:
                    run["row_settings"] = row
                write_json_atomic(run, run_dir / _RUN_FILE)
            runs[topology.key][seed] = run
            write_json_atomic(summarise_compare(settings, runs, held_out), out_dir / "compare.json")
    report = summarise_compare(settings, runs, held_out)
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    write_json_atomic(report, out_dir / "compare.json")
    write_text_atomic(compare_markdown(report), out_dir / "compare.md")
    return report


# ---------------------------------------------------------------------------------------------------------- tables


def _epsilon_cell(row: Mapping) -> str:
    epsilon, delta = row.get("epsilon"), row.get("delta")
    return "-" if epsilon is None else f"{epsilon:.2f} ({delta:.0e})"


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return statistics.fmean(values) if values else None


def summarise_compare(
    settings: CompareSettings, runs: Mapping[str, Mapping[int, Mapping]], held_out: Mapping[int, Mapping] | None = None
) -> dict:
    """Per topology: Dice per seed and their mean, the paired difference to the first topology with its 95 %
    interval, upload bytes and wall seconds per iteration, rounds; and each drift treatment's paired difference to
    its own topology's plain row and DWCS's to FedProx (``drift_treatments``,
    :mod:`splitunet.evaluation.drift_treatments`), and each DP-SGD row's to the same topology without DP
    (``dp_costs``).

    Args:
        settings: the study's settings (rows in ``settings.topologies`` order; the first is the reference).
        runs: topology key -> seed -> a run's figures (``dice``, ``iterations``, ``rounds``,
            ``upload_bytes_per_iteration``, ``elapsed_s``, ``held_out``); missing runs are left out.
        held_out: seed -> hospital -> held-out case IDs.
    """
    keys = list(settings.topologies)
    reference = keys[0]
    reference_runs = runs.get(reference, {})
    rows = []
    for key in keys:
        topology = _BY_KEY[key]
        mine = runs.get(key, {})
        seeds = sorted(mine)
        paired = [seed for seed in seeds if seed in reference_runs]
        difference = {
            region: paired_interval(
                [float(mine[s]["dice"][region]) - float(reference_runs[s]["dice"][region]) for s in paired]
            )
            for region in REGIONS
        }
        difference["mean"] = paired_interval(
            [_mean_dice(mine[s]["dice"]) - _mean_dice(reference_runs[s]["dice"]) for s in paired]
        )
        seconds = [
            mine[s]["elapsed_s"] / mine[s]["iterations"]
            for s in seeds
            if mine[s].get("elapsed_s") and mine[s].get("iterations")
        ]
        # Epsilon is per data holder: the worst holder and seed, never a mean (an average of epsilons means nothing).
        private = [mine[s] for s in seeds if mine[s].get("epsilon") is not None]
        rows.append(
            {
                "key": key,
                "label": topology.label,
                "kind": topology.kind,
                "job": topology.job,
                "seeds": seeds,
                "dice_by_seed": {str(s): mine[s]["dice"] for s in seeds},
                "dice_mean": {
                    region: statistics.fmean(float(mine[s]["dice"][region]) for s in seeds) if seeds else math.nan
                    for region in REGIONS
                },
                "hd95_mean": {
                    region: _mean((mine[s].get("hd95") or {}).get(region) for s in seeds) for region in REGIONS
                },
                "difference_to_reference": difference,
                "iterations": sorted({mine[s]["iterations"] for s in seeds}),
                "rounds": next((mine[s]["rounds"] for s in seeds if mine[s].get("rounds")), None),
                "upload_bytes_per_iteration": _mean(mine[s].get("upload_bytes_per_iteration") for s in seeds),
                "seconds_per_iteration": _mean(seconds),
                "seconds_per_run": [mine[s].get("elapsed_s") for s in seeds],
                "target_epsilon": topology.options.get("dp_epsilon"),
                "epsilon": max((float(run["epsilon"]) for run in private), default=None),
                "delta": max((float(run["delta"]) for run in private), default=None),
            }
        )
    return {
        "steps": settings.steps,
        "rounds": settings.rounds,
        "seeds": list(settings.seeds),
        "reference": _BY_KEY[reference].label,
        "settings": settings.fingerprint(),
        "held_out": {str(seed): dict(cases) for seed, cases in (held_out or {}).items()},
        "rows": rows,
        "drift_treatments": treatment_differences(rows),
        "dp_costs": treatment_differences(rows, DP_TREATMENTS),
        # Every run's own record, so that a study continues elsewhere from this file alone (run_compare's reuse).
        "runs": {key: {str(seed): dict(run) for seed, run in by_seed.items()} for key, by_seed in runs.items()},
    }


def _curve_steps(report: Mapping) -> list[int]:
    """The steps at which every run of the report was scored (empty when any run has no curve)."""
    steps = None
    for row in report["rows"]:
        for seed in row["dice_by_seed"]:
            run = (report.get("runs") or {}).get(row["key"], {}).get(seed) or {}
            scored = {point["iteration"] for point in run.get("curve") or []}
            steps = scored if steps is None else steps & scored
    return sorted(steps or [])


def curve_markdown(report: Mapping) -> str:
    """Learning curves and whether the rows stopped moving, for a study run with ``curve_every`` ('' otherwise).

    Each row's mean Dice (mean over seeds) at every scored step; then each row at the end against the same row at
    half the budget (the last scored step at or before it), paired by seed, read by
    :func:`splitunet.evaluation.budget_change.budget_changes`; then, where the second half of the budget holds three
    scorings or more, each row's level and trend over them (:mod:`splitunet.evaluation.plateau`).
    """
    from splitunet.evaluation.budget_change import budget_at, budget_changes, budget_markdown
    from splitunet.evaluation.plateau import MIN_WINDOW_SCORINGS, plateau_markdown, plateau_reading

    steps = _curve_steps(report)
    if len(steps) < 2:
        return ""
    runs = report["runs"]
    lines = [
        "Learning curves: each row's mean Dice (mean of TC, WT, ET over the held-out cases; mean over seeds) at "
        "every scored step.",
        "",
        "| topology | " + " | ".join(str(step) for step in steps) + " |",
        "|---|" + "---|" * len(steps),
    ]
    for row in report["rows"]:
        cells = []
        for step in steps:
            values = [
                _mean_dice(point["dice"])
                for seed in row["dice_by_seed"]
                for point in runs[row["key"]][seed]["curve"]
                if point["iteration"] == step
            ]
            cells.append(f"{statistics.fmean(values):.3f}" if values else "-")
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    # Half the budget, or the first scored step when the study scored none that early.
    half = max([step for step in steps[:-1] if step <= steps[-1] // 2] or [steps[0]])
    shorter = budget_at(report, half)
    lines += ["", "Has each row stopped moving? The end of every run against its own step " + str(half) + ".", ""]
    # DP rows are named under the table with why they are not read (budget_markdown's "Not read").
    lines.append(budget_markdown(budget_changes(shorter, report)).rstrip("\n"))
    window = [step for step in steps if step >= half]
    if len(window) >= MIN_WINDOW_SCORINGS:
        lines += [
            "",
            f"Where has each row levelled off? A run's end point is one draw of its scorings; over the scorings from "
            f"step {half} on, each run's mean (its level) and the change its own least-squares trend implies:",
            "",
            plateau_markdown(plateau_reading(report, start=half)).rstrip("\n"),
        ]
    return "\n".join(lines) + "\n"


_DP_COST_INTRO = (
    "What DP-SGD costs: each DP row against the same topology without DP-SGD, paired by seed (with DP minus without, "
    "Dice points, mean over seeds [95 % t interval]); 'hurts' only where the mean-Dice interval excludes 0."
)


def compare_markdown(report: Mapping) -> str:
    """The table: Dice per region (mean over seeds), the paired difference to the reference in Dice points with its
    95 % interval, upload bytes and wall seconds per iteration, epsilon spent (DP rows), rounds (utility.md's
    style)."""
    settings = report.get("settings", {})
    held_out = report.get("held_out") or {}
    per_seed = sorted({sum(len(cases) for cases in hospitals.values()) for hospitals in held_out.values()})
    lines = [
        f"{report['steps']} AdamW steps per model, paired seeds {report['seeds']}; every topology of a seed trains on "
        f"the same {settings.get('hospitals', '?')} phantom hospitals' patients and is scored on the same "
        f"{'/'.join(str(n) for n in per_seed) or '?'} held-out cases. Differences are in Dice points against "
        f"'{report['reference']}', mean over seeds [95 % t interval].",
        "",
        "| topology | rounds | Dice TC | Dice WT | Dice ET | Δ mean Dice (points) | Δ TC | Δ WT | Δ ET "
        "| HD95 TC | HD95 WT | HD95 ET | upload / iteration | s / iteration | ε (δ) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        dice, difference, hd95 = row["dice_mean"], row["difference_to_reference"], row.get("hd95_mean") or {}
        size = row.get("upload_bytes_per_iteration")
        seconds = row.get("seconds_per_iteration")
        cells = [
            row["label"],
            str(row["rounds"]) if row.get("rounds") else "-",
            *(f"{dice[region]:.3f}" if math.isfinite(dice[region]) else "-" for region in REGIONS),
            _interval_cell(difference["mean"]),
            *(_interval_cell(difference[region]) for region in REGIONS),
            *(f"{hd95[region]:.1f}" if hd95.get(region) is not None else "-" for region in REGIONS),
            f"{size / 1e6:.3f} MB" if size else "-",
            f"{seconds:.2f}" if seconds else "-",
            _epsilon_cell(row),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Upload: tensor bytes all data holders together send the server per training iteration, as received "
        "(vertical: the sites' activations; SplitFed: one cohort's activations and each round's encoders; U-shape: "
        "x0, dL/du2 and each round's heads and tails; FedAvg: every hospital's float32 weights once a round). "
        "s / iteration: the whole run's wall time, simulator start-up and validation included, over its iterations. "
        "HD95: 95th-percentile Hausdorff distance in voxels (MONAI), "
        "mean over held-out cases and seeds; a region missed entirely (or predicted where there is none) scores the "
        "volume's diagonal, the BraTS convention.",
    ]
    if any(row.get("target_epsilon") is not None for row in report["rows"]):
        lines[-1] += (
            " ε (δ): the epsilon DP-SGD spent per data holder (a FedAvg hospital over its training cases, a vertical "
            "site over every case it holds), the largest over holders and seeds, at the δ of the job's rule "
            "min(1e-5, 1/(10 N)); '-': no DP-SGD. It covers each holder's weights, not the activations a split site "
            "sends (docs/dp.md)."
        )
    if any(row.get("kind") == "splitfed" for row in report["rows"]):
        lines[-1] += (
            " A SplitFed step trains one hospital's cohort, so each of its encoders takes about 1/hospitals of the "
            "steps (its decoder all of them)."
        )
    # Computed from the rows, so that a report written before this table existed renders it too.
    treatments = treatment_markdown(treatment_differences(report["rows"]))
    if treatments:
        lines += ["", treatments.rstrip("\n")]
    dp_costs = treatment_markdown(treatment_differences(report["rows"], DP_TREATMENTS), _DP_COST_INTRO)
    if dp_costs:
        lines += ["", dp_costs.rstrip("\n")]
    curves = curve_markdown(report)
    if curves:
        lines += ["", curves.rstrip("\n")]
    run_seconds = [t for row in report["rows"] for t in row.get("seconds_per_run", []) if t]
    if run_seconds:
        lines += ["", f"{len(run_seconds)} runs, {sum(run_seconds) / 60:.1f} min of training and validation in all."]
    return "\n".join(lines) + "\n"
