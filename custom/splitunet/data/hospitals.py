"""Non-IID phantom hospitals: one MSD Task01-layout data set per hospital, each with its own kind of cases and scanner.

Federated training across hospitals is hard because their data differ (non-IID), not merely because they are many.
A :class:`HospitalProfile` says how one hospital's cases differ from the default phantom, through the knobs of
:func:`splitunet.data.phantom.synthesize_case`: tumour size (which patients the hospital sees), scanner gain and
tissue contrast (vendor and protocol), bias field strength and noise (field strength and coils).
:data:`NON_IID_PROFILES` are three such hospitals and :func:`generate_hospitals` writes their data sets::

    out_dir/hospitals.json               the profiles, case counts and seeds
    out_dir/hospital_a/dataset.json      MSD layout, as generate_phantom writes it
    out_dir/hospital_a/imagesTr/BRATS_001.nii.gz ...
    out_dir/hospital_b/imagesTr/BRATS_009.nii.gz ...   (case IDs continue: no ID is shared between hospitals)

Example::

    from splitunet.data.hospitals import NON_IID_PROFILES, generate_hospitals

    roots = generate_hospitals("/tmp/hospitals", NON_IID_PROFILES, cases_per_hospital=8, shape=(64, 64, 64))
    # {"hospital_a": Path("/tmp/hospitals/hospital_a"), "hospital_b": ..., "hospital_c": ...}
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from numbers import Integral
from os import PathLike
from pathlib import Path

from splitunet.atomic_files import write_json_atomic
from splitunet.data.phantom import _check_variation, generate_phantom

__all__ = ["HospitalProfile", "NON_IID_PROFILES", "generate_hospitals"]

# A profile's name becomes a folder and, in a simulation, usually a FLARE site name: keep it to safe characters.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclasses.dataclass(frozen=True)
class HospitalProfile:
    """How one hospital's phantom cases differ from the default ones (every scale 1.0 is the default phantom).

    Attributes:
        name: folder name of the hospital's data set (letters, digits, ``_`` and ``-``).
        tumour_size_scale: > 0, multiplies tumour radii, rim thickness and oedema extent.
        intensity_scale: > 0, multiplies the scanner gain (raw intensity units).
        contrast_scale: > 0, spreads (> 1) or compresses (< 1) the tissue intensities about their geometric mean.
        bias_field_strength: >= 0, multiplies the log bias field.
        noise_scale: >= 0, multiplies the Rician noise level.
        description: one line for people reading results.

    The knobs are those of :func:`splitunet.data.phantom.synthesize_case`, checked by its rules on construction.
    """

    name: str
    tumour_size_scale: float = 1.0
    intensity_scale: float = 1.0
    contrast_scale: float = 1.0
    bias_field_strength: float = 1.0
    noise_scale: float = 1.0
    description: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"hospital name must be letters, digits, '_' or '-', got {self.name!r}")
        # The phantom's own rules, checked now: a bad profile must fail before any hospital's data is written.
        _check_variation(**self.phantom_options())

    def phantom_options(self) -> dict[str, float]:
        """The keyword arguments of :func:`~splitunet.data.phantom.generate_phantom` that make this hospital's cases."""
        return {
            "tumour_size_scale": self.tumour_size_scale,
            "intensity_scale": self.intensity_scale,
            "contrast_scale": self.contrast_scale,
            "bias_field_strength": self.bias_field_strength,
            "noise_scale": self.noise_scale,
        }

    def describe(self) -> dict:
        """JSON-ready settings, for an index file or a run's ``results.json``."""
        return dataclasses.asdict(self)


# Three hospitals that differ in every knob at once, as real ones do. The values are far enough apart to be
# measurable in a few small cases (tests/data/test_hospitals.py) and stay where every tumour label is still drawn.
NON_IID_PROFILES: tuple[HospitalProfile, ...] = (
    HospitalProfile(
        name="hospital_a",
        # A tertiary referral centre on 3 T: large, advanced tumours; more signal (less noise) but a stronger RF
        # inhomogeneity at the higher field; a protocol with more tissue contrast.
        tumour_size_scale=1.5,
        intensity_scale=1.0,
        contrast_scale=1.25,
        bias_field_strength=1.8,
        noise_scale=0.6,
        description="referral centre, 3 T: large tumours, high contrast, strong bias field, low noise",
    ),
    HospitalProfile(
        name="hospital_b",
        # A general hospital on 1.5 T from another vendor: typical tumours, a scanner whose raw units are half as
        # large, a flatter field.
        tumour_size_scale=1.0,
        intensity_scale=0.5,
        contrast_scale=1.0,
        bias_field_strength=0.7,
        noise_scale=1.0,
        description="general hospital, 1.5 T: typical tumours, half the raw intensity scale, weak bias field",
    ),
    HospitalProfile(
        name="hospital_c",
        # Tumours found early (small), on an older scanner with a faster, lower-contrast protocol and more noise,
        # whose raw units are twice as large.
        tumour_size_scale=0.65,
        intensity_scale=2.0,
        contrast_scale=0.8,
        bias_field_strength=1.0,
        noise_scale=1.5,
        description="early detection, older scanner: small tumours, twice the raw intensity scale, low contrast, noisy",
    ),
)


def generate_hospitals(
    out_dir: str | PathLike,
    profiles: Sequence[HospitalProfile] = NON_IID_PROFILES,
    cases_per_hospital: int | Sequence[int] = 8,
    shape: Sequence[int] = (64, 64, 64),
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Path]:
    """Write one phantom data set per hospital, in ``out_dir/<name>/`` (MSD Task01 layout, see
    :func:`~splitunet.data.phantom.generate_phantom`), and ``out_dir/hospitals.json`` describing them.

    Hospital ``k`` (0-based, in the order of ``profiles``) uses seed ``seed + k`` and numbers its cases after those
    of the hospitals before it, so no two hospitals share a case ID (cases can be pooled or compared by ID) and the
    same ``(seed, k)`` always gives the same data. Each hospital's cases depend only on its own profile, seed, case
    numbers and ``shape``.

    Args:
        out_dir: parent folder, created if missing; existing files of the same names are replaced.
        profiles: the hospitals, with distinct names.
        cases_per_hospital: one count for every hospital, or one per profile (hospitals also differ in size,
            which weighted averaging by case count takes into account); each >= 1.
        shape: output grid ``(D, H, W)``, three ints >= 16.
        seed: non-negative base seed.
        progress: show a progress bar per hospital.

    Returns:
        hospital name -> its data set folder, in the order of ``profiles``.

    Raises:
        ValueError: if an argument is invalid.
    """
    profiles = tuple(profiles)
    if not profiles or not all(isinstance(p, HospitalProfile) for p in profiles):
        raise ValueError("profiles must be a non-empty sequence of HospitalProfile")
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise ValueError(f"hospital names must be distinct, got {names}")
    counts = _case_counts(cases_per_hospital, len(profiles))
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")

    root = Path(out_dir)
    roots: dict[str, Path] = {}
    index: list[dict] = []
    first_index = 1
    for k, (profile, count) in enumerate(zip(profiles, counts)):
        hospital_seed = int(seed) + k
        roots[profile.name] = generate_phantom(
            root / profile.name,
            count,
            shape=shape,
            seed=hospital_seed,
            progress=progress,
            first_index=first_index,
            **profile.phantom_options(),
        )
        index.append(
            {
                **profile.describe(),
                "path": profile.name,
                "num_cases": count,
                "seed": hospital_seed,
                "case_numbers": [first_index, first_index + count - 1],
            }
        )
        first_index += count
    summary = {"shape": [int(s) for s in shape], "seed": int(seed), "hospitals": index}
    write_json_atomic(summary, root / "hospitals.json")
    return roots


def _case_counts(cases_per_hospital, num_hospitals: int) -> list[int]:
    if isinstance(cases_per_hospital, Sequence) and not isinstance(cases_per_hospital, (str, bytes)):
        counts = list(cases_per_hospital)
    else:
        counts = [cases_per_hospital] * num_hospitals
    if len(counts) != num_hospitals:
        raise ValueError(f"cases_per_hospital has {len(counts)} counts for {num_hospitals} hospitals")
    for count in counts:
        if isinstance(count, bool) or not isinstance(count, Integral) or count < 1:
            raise ValueError(f"every case count must be an int >= 1, got {cases_per_hospital!r}")
    return [int(c) for c in counts]
