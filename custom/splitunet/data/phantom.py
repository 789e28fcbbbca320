"""Deterministic multi-modal brain-tumour MRI phantom in the MSD Task01_BrainTumour layout.

Every case starts from the MNI ICBM152 2009a grey-matter, white-matter and brain-mask templates that ship inside
the nilearn wheel (no download), so the anatomy is that of a real average brain rather than of nested spheres.
A case is made in these steps, each a small function below:

1. anatomy: the templates resampled once per output shape (:func:`_anatomy`, cached);
2. deformation: a random affine plus a smooth elastic field, and the tumour's mass effect pushing tissue away
   from its centre (:func:`_deformation`, :func:`_mass_effect`);
3. tumour: necrotic/non-enhancing core (label 2), enhancing rim (label 3) and oedema (label 1) that spreads
   irregularly, preferably along white matter, and stays inside the brain (:func:`_tumour`);
4. contrasts: partial-volume mixing of per-tissue intensities for FLAIR, T1w, T1gd and T2w (:func:`_contrasts`);
5. acquisition: a smooth multiplicative bias field and Rician noise per modality (:func:`_acquire`);
6. writing: 4D float32 image, 3D uint8 label and ``dataset.json``, each written atomically (:func:`_save_nifti`).

The tissue intensities are chosen so that no single modality separates all labels: the enhancing rim stands out
only in T1gd, oedema is bright in FLAIR and T2w but close to the core in T2w, and the core is dark in T1w but
close to grey matter in FLAIR. A segmentation model therefore needs all four sites, as in the real task.

Hospitals differ (non-IID data): keyword-only knobs of :func:`generate_phantom` and :func:`synthesize_case` scale
the tumour size, the scanner gain (intensity scale), the tissue contrast, the bias field and the noise. Every knob
acts on a random draw after it is made and never changes how many numbers are drawn. So at the defaults (all 1.0)
the output is bit for bit what it was before the knobs existed, and the same case made with a knob changed keeps
its anatomy and tumour position and differs in what that knob controls. :mod:`splitunet.data.hospitals` uses them
to make one data set per hospital.

Example::

    from splitunet.data.phantom import generate_phantom

    root = generate_phantom("/tmp/phantom", num_cases=8, shape=(64, 64, 64), seed=0)
    # root/dataset.json, root/imagesTr/BRATS_001.nii.gz (64, 64, 64, 4), root/labelsTr/BRATS_001.nii.gz (64, 64, 64)
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from numbers import Integral, Real
from os import PathLike
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from splitunet.atomic_files import atomic_path, write_text_atomic

__all__ = ["generate_phantom", "synthesize_case", "PHANTOM_LABELS", "PHANTOM_MODALITIES"]

# MSD Task01_BrainTumour channel order and label values (docs/design.md, "Labels and layouts").
PHANTOM_MODALITIES = ("FLAIR", "T1w", "t1gd", "T2w")
# Spelled as MSD Task01's own dataset.json spells them.
PHANTOM_LABELS = {0: "background", 1: "edema", 2: "non-enhancing tumor", 3: "enhancing tumour"}

# Field of view of the 1 mm MNI ICBM152 2009a templates in nilearn: shape and world position of voxel (0, 0, 0).
# Fixed here so that the output affine does not depend on which template resolution was read.
_MNI_SHAPE = np.array((197, 233, 189))
_MNI_ORIGIN = np.array((-98.0, -134.0, -72.0))
_MNI_FOV = _MNI_SHAPE.astype(np.float64)  # mm, the templates have 1 mm voxels

_MIN_SIZE = 16
_MAX_ATTEMPTS = 8

# Tissue classes mixed by partial volume, in this order everywhere below.
_TISSUES = ("csf", "gm", "wm", "oedema", "core", "enhancing")
# Mean intensity per tissue (rows) and modality (columns FLAIR, T1w, T1gd, T2w), white matter in T1w ~ 0.85.
# Orderings follow clinical appearance: FLAIR suppresses CSF and shows oedema bright; T1w has WM > GM > CSF with a
# dark core; T1gd is T1w with a very bright enhancing rim (and slightly lower GM/WM contrast); T2w has bright CSF,
# oedema and core. Values are chosen so that each label pair is confusable in at least one modality.
_CONTRAST = np.array(
    [
        # FLAIR  T1w   T1gd  T2w
        [0.12, 0.25, 0.30, 1.00],  # CSF
        [0.55, 0.60, 0.64, 0.62],  # grey matter
        [0.42, 0.85, 0.82, 0.40],  # white matter
        [0.95, 0.52, 0.55, 0.85],  # oedema: FLAIR/T2 bright, T1 slightly dark
        [0.58, 0.30, 0.34, 0.80],  # necrotic / non-enhancing core: T1 dark, FLAIR near GM, T2 near oedema
        [0.88, 0.56, 1.45, 0.72],  # enhancing rim: distinct only in T1gd
    ],
    dtype=np.float32,
)
_LABEL_OF_CLASS = np.array([0, 0, 0, 0, 1, 2, 3], dtype=np.uint8)  # background, csf, gm, wm, oedema, core, enh.


class _Anatomy(NamedTuple):
    """Templates resampled to the output grid; all arrays are float32 ``(D, H, W)`` and read-only."""

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    depth: np.ndarray  # distance (mm) from the brain surface, inside the brain
    spacing: np.ndarray  # (3,) voxel size in mm
    affine: np.ndarray  # (4, 4) RAS voxel-to-world


class _Tumour(NamedTuple):
    """Soft tumour maps on the output grid, values in [0, 1]."""

    core: np.ndarray  # necrotic / non-enhancing core
    enhancing: np.ndarray  # enhancing rim
    oedema: np.ndarray  # oedema (already restricted to GM/WM)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def generate_phantom(
    out_dir: str | PathLike,
    num_cases: int,
    shape: Sequence[int] = (64, 64, 64),
    seed: int = 0,
    progress: bool = True,
    *,
    first_index: int = 1,
    tumour_size_scale: float = 1.0,
    intensity_scale: float = 1.0,
    contrast_scale: float = 1.0,
    bias_field_strength: float = 1.0,
    noise_scale: float = 1.0,
) -> Path:
    """Write a synthetic brain-tumour data set in the MSD Task01_BrainTumour layout.

    Layout::

        out_dir/dataset.json                 MSD-style index of all cases
        out_dir/imagesTr/BRATS_001.nii.gz    float32 (D, H, W, 4): FLAIR, T1w, T1gd, T2w
        out_dir/labelsTr/BRATS_001.nii.gz    uint8 (D, H, W): 0 background, 1 oedema, 2 non-enhancing, 3 enhancing

    Case ``i`` (1-based) depends only on ``(seed, i, shape)`` and the variation knobs: the same arguments give
    byte-identical arrays and adding cases never changes earlier ones. Every case holds all three tumour labels.
    Files are written under a temporary name and renamed, so an interrupted run never leaves a truncated file under
    a final name; ``dataset.json`` is written last.

    Args:
        out_dir: output folder, created if missing; existing files of the same names are replaced.
        num_cases: number of cases, >= 1.
        shape: output grid ``(D, H, W)``, three ints >= 16. The MNI field of view (197 x 233 x 189 mm) is
            divided by it, so voxels are anisotropic unless ``shape`` follows that aspect ratio.
        seed: non-negative base seed.
        progress: show a tqdm progress bar over cases.
        first_index: number of the first case (``BRATS_{first_index:03d}``), >= 0; data sets that must not share
            case IDs (one per hospital) start at different numbers.
        tumour_size_scale, intensity_scale, contrast_scale, bias_field_strength, noise_scale: how the cases'
            source differs from the default one; see :func:`synthesize_case`. Non-default values are recorded
            in ``dataset.json`` under ``phantom.variation``.

    Returns:
        ``out_dir`` as a :class:`pathlib.Path`.

    Raises:
        ValueError: if an argument is invalid.
    """
    num_cases = _check_int("num_cases", num_cases, minimum=1)
    shape = _check_shape(shape)
    seed = _check_int("seed", seed, minimum=0)
    first_index = _check_int("first_index", first_index, minimum=0)
    variation = _check_variation(
        tumour_size_scale=tumour_size_scale,
        intensity_scale=intensity_scale,
        contrast_scale=contrast_scale,
        bias_field_strength=bias_field_strength,
        noise_scale=noise_scale,
    )
    if not isinstance(out_dir, (str, PathLike)):
        raise ValueError(f"out_dir must be a path, got {type(out_dir).__name__}")

    root = Path(out_dir)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)

    training = []
    indices = range(first_index, first_index + num_cases)
    for index in tqdm(indices, desc="phantom", unit="case", disable=not progress):
        name = f"BRATS_{index:03d}"
        image, label, affine = synthesize_case(index, shape=shape, seed=seed, **variation._asdict())
        _save_nifti(image, affine, root / "imagesTr" / f"{name}.nii.gz")
        _save_nifti(label, affine, root / "labelsTr" / f"{name}.nii.gz")
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})

    index_json = _dataset_index(training, shape, seed, variation)
    write_text_atomic(json.dumps(index_json, indent=4) + "\n", root / "dataset.json")
    return root


def synthesize_case(
    index: int,
    shape: Sequence[int] = (64, 64, 64),
    seed: int = 0,
    *,
    tumour_size_scale: float = 1.0,
    intensity_scale: float = 1.0,
    contrast_scale: float = 1.0,
    bias_field_strength: float = 1.0,
    noise_scale: float = 1.0,
) -> tuple[np.ndarray, ...]:
    """Make one phantom case in memory (what :func:`generate_phantom` writes as ``BRATS_{index:03d}``).

    The knobs model what differs between hospitals; each multiplies a random draw, so 1.0 leaves it as it is.

    Args:
        index: case number (1-based in :func:`generate_phantom`); any non-negative int.
        shape: output grid ``(D, H, W)``, three ints >= 16.
        seed: non-negative base seed.
        tumour_size_scale: > 0, multiplies the tumour's core radius, rim thickness and oedema extent (a referral
            centre sees larger tumours than a screening programme). The voxel floors that keep every label
            resolvable still apply, so on coarse grids small scales shrink mainly the oedema.
        intensity_scale: > 0, multiplies the scanner gain (arbitrary units per vendor and protocol). Per-case
            intensity normalisation removes it; it matters to anything that reads raw intensities.
        contrast_scale: > 0, exponent on the tissue intensities relative to their geometric mean per modality
            (sequence timing): above 1 tissues lie further apart, below 1 closer; orderings are kept.
        bias_field_strength: >= 0, multiplies the log bias field (0: none; 1: about +-15 %; stronger at high
            field strength, where RF inhomogeneity grows).
        noise_scale: >= 0, multiplies the Rician noise level (lower at higher field strength).

    Returns:
        ``(image, label, affine)``: float32 ``(D, H, W, 4)`` in MSD channel order (FLAIR, T1w, T1gd, T2w),
        uint8 ``(D, H, W)`` with values in {0, 1, 2, 3}, and the float64 ``(4, 4)`` RAS affine.

    Raises:
        ValueError: if an argument is invalid.
        RuntimeError: if no tumour with all three labels could be placed (not seen in practice).
    """
    index = _check_int("index", index, minimum=0)
    shape = _check_shape(shape)
    seed = _check_int("seed", seed, minimum=0)
    variation = _check_variation(
        tumour_size_scale=tumour_size_scale,
        intensity_scale=intensity_scale,
        contrast_scale=contrast_scale,
        bias_field_strength=bias_field_strength,
        noise_scale=noise_scale,
    )

    anatomy = _anatomy(shape)
    # One generator per case, so case i does not depend on how many cases are made or in which order.
    rng = np.random.default_rng([seed, index])
    for _ in range(_MAX_ATTEMPTS):
        fractions = _tumorous_anatomy(rng, anatomy, variation.tumour_size_scale)
        if fractions is None:
            continue
        label = _LABEL_OF_CLASS[np.argmax(fractions, axis=0)]
        if np.all(np.isin((1, 2, 3), label)):
            image = _acquire(rng, _contrasts(rng, fractions, anatomy, variation.contrast_scale), anatomy, variation)
            return image, label, anatomy.affine.copy()
    raise RuntimeError(f"could not place a tumour with all three labels for case {index} at shape {shape}")


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class _Variation(NamedTuple):
    """The knobs of :func:`synthesize_case`, checked; field names are its keyword arguments."""

    tumour_size_scale: float = 1.0
    intensity_scale: float = 1.0
    contrast_scale: float = 1.0
    bias_field_strength: float = 1.0
    noise_scale: float = 1.0


_DEFAULT_VARIATION = _Variation()
# Knobs that scale a size or a gain must be > 0; those that scale a perturbation may switch it off with 0.
_ZERO_ALLOWED = ("bias_field_strength", "noise_scale")


def _check_variation(**knobs) -> _Variation:
    checked = {}
    for name, value in knobs.items():
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        if value < 0 or (value == 0 and name not in _ZERO_ALLOWED):
            raise ValueError(f"{name} must be {'>=' if name in _ZERO_ALLOWED else '>'} 0, got {value}")
        checked[name] = float(value)
    return _Variation(**checked)


def _check_shape(shape) -> tuple[int, int, int]:
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or len(shape) != 3:
        raise ValueError(f"shape must be three ints (D, H, W) >= {_MIN_SIZE}, got {shape!r}")
    for size in shape:
        if isinstance(size, bool) or not isinstance(size, Integral) or size < _MIN_SIZE:
            raise ValueError(f"shape must be three ints (D, H, W) >= {_MIN_SIZE}, got {tuple(shape)!r}")
    return tuple(int(s) for s in shape)


# ----------------------------------------------------------------------------------------------------------------
# Anatomy
# ----------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _anatomy(shape: tuple[int, int, int]) -> _Anatomy:
    """Resample the MNI templates to ``shape`` (once per shape and process; the 1 mm read takes ~1 s)."""
    from nilearn import datasets  # imported late: nilearn is slow to import and only the phantom needs it

    def read(loader) -> np.ndarray:
        return np.asarray(loader(resolution=1).dataobj, dtype=np.float32)

    gm = read(datasets.load_mni152_gm_template)
    wm = read(datasets.load_mni152_wm_template)
    # The GM map leaks slightly outside the brain mask; the union keeps every tissue voxel inside the brain.
    brain = np.maximum(read(datasets.load_mni152_brain_mask), np.minimum(gm + wm, 1.0))

    spacing = _MNI_FOV / np.asarray(shape)
    # Output voxel centres in 1 mm template index coordinates (both grids span the same field of view).
    axes = [-0.5 + (np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)]
    # Low-pass before sampling so that coarse grids show partial volume instead of aliased folds.
    sigma = np.maximum(0.0, 0.42 * (spacing - 1.0))

    def resample(volume: np.ndarray) -> np.ndarray:
        smooth = ndimage.gaussian_filter(volume, sigma) if np.any(sigma > 0) else volume
        return _sample_separable(smooth, axes)

    gm, wm, brain = (np.clip(resample(v), 0.0, 1.0) for v in (gm, wm, brain))
    tissue = gm + wm
    wm = np.where(tissue > brain, wm * brain / np.maximum(tissue, 1e-6), wm).astype(np.float32)
    gm = np.where(tissue > brain, gm * brain / np.maximum(tissue, 1e-6), gm).astype(np.float32)
    # CSF is what the brain mask holds beyond GM and WM (ventricles, sulci, cisterns).
    csf = np.clip(brain - gm - wm, 0.0, 1.0).astype(np.float32)
    depth = ndimage.distance_transform_edt(brain > 0.5, sampling=spacing).astype(np.float32)

    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = _MNI_ORIGIN - 0.5 + 0.5 * spacing
    for array in (gm, wm, csf, brain, depth, spacing, affine):
        array.setflags(write=False)  # shared by every case through the cache
    return _Anatomy(gm, wm, csf, brain, depth, spacing, affine)


def _sample_separable(volume: np.ndarray, axes: Sequence[np.ndarray]) -> np.ndarray:
    """Trilinear sampling of ``volume`` on the tensor grid ``axes`` (one axis at a time: cheap and exact)."""
    out = volume
    for dim, coords in enumerate(axes):
        coords = np.clip(coords, 0, volume.shape[dim] - 1)
        lo = np.minimum(np.floor(coords).astype(np.intp), volume.shape[dim] - 2)
        frac = (coords - lo).astype(np.float32)
        view = [1, 1, 1]
        view[dim] = -1
        frac = frac.reshape(view)
        out = np.take(out, lo, axis=dim) * (1 - frac) + np.take(out, lo + 1, axis=dim) * frac
    return np.ascontiguousarray(out, dtype=np.float32)


@functools.lru_cache(maxsize=8)
def _grid_mm(shape: tuple[int, int, int]) -> np.ndarray:
    """Voxel centres in mm relative to the field-of-view centre, float32 ``(3, D, H, W)``, read-only."""
    spacing = _MNI_FOV / np.asarray(shape)
    axes = [((np.arange(n) + 0.5) * s - n * s / 2).astype(np.float32) for n, s in zip(shape, spacing)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"))
    grid.setflags(write=False)
    return grid


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], corr_mm: float, count: int = 1) -> np.ndarray:
    """Smooth zero-mean, unit-variance random fields, float32 ``(count, D, H, W)``.

    Drawn on a coarse lattice whose size depends only on ``corr_mm`` (not on ``shape``), so a case looks the same
    at every resolution, then smoothed and upsampled linearly: much cheaper than filtering at full size.
    """
    coarse = tuple(int(np.ceil(f / (corr_mm / 2.0))) + 2 for f in _MNI_FOV)
    noise = rng.standard_normal((count, *coarse), dtype=np.float32)
    out = np.empty((count, *shape), dtype=np.float32)
    axes = [np.linspace(0, c - 1, n) for c, n in zip(coarse, shape)]
    for k in range(count):
        field = ndimage.gaussian_filter(noise[k], 1.0, mode="wrap")
        field = (field - field.mean()) / max(float(field.std()), 1e-6)
        out[k] = _sample_separable(field, axes)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Deformation
# ----------------------------------------------------------------------------------------------------------------


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """Random rotation matrix with angles uniform in +-``max_deg`` about each axis."""
    a, b, c = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _apply_linear(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``matrix @ points`` for ``(3, ...)`` points, written out so that no threaded BLAS can change the bits."""
    m = matrix.astype(np.float32)
    return np.stack([m[i, 0] * points[0] + m[i, 1] * points[1] + m[i, 2] * points[2] for i in range(3)])


def _deformation(rng: np.random.Generator, shape: Sequence[int]):
    """Random subject-to-template map: ``x -> A x + t + e(x)`` in mm (A: rotation and scaling, e: elastic).

    Returns a function of output-space points ``(3, D, H, W)`` (mm) giving template-space points, so the mass
    effect can be inserted before it.
    """
    # Head size and pose vary between subjects: +-8 degrees, +-8 % per axis, +-6 mm.
    linear = _rotation(rng, 8.0) @ np.diag(rng.uniform(0.92, 1.08, size=3))
    shift = rng.uniform(-6.0, 6.0, size=3).astype(np.float32).reshape(3, 1, 1, 1)
    # Elastic part: ~3 mm displacements varying over ~30 mm, the scale of gyri and ventricle shape differences.
    elastic = 3.0 * _smooth_noise(rng, shape, corr_mm=30.0, count=3)

    def warp(points: np.ndarray) -> np.ndarray:
        return _apply_linear(linear, points) + shift + elastic

    return warp


def _mass_effect(points: np.ndarray, centre: np.ndarray, strength: float, radius_mm: float) -> np.ndarray:
    """Pull the sampling points towards ``centre``, which pushes the imaged tissue away from it.

    The radial map ``r -> r (1 - s exp(-r^2 / 2 R^2))`` with ``s < 1`` is monotonic, so tissue is compressed
    around the tumour and never folds.
    """
    offset = points - centre.reshape(3, 1, 1, 1)
    r2 = np.sum(offset * offset, axis=0)
    return centre.reshape(3, 1, 1, 1) + offset * (1.0 - strength * np.exp(-r2 / (2.0 * radius_mm**2)))


def _sample(volume: np.ndarray, points_mm: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Trilinear lookup of an output-grid ``volume`` at template-space points (mm from the FOV centre)."""
    shape = np.asarray(volume.shape)
    index = [
        (points_mm[i] + np.float32(shape[i] * spacing[i] / 2.0)) / np.float32(spacing[i]) - np.float32(0.5)
        for i in range(3)
    ]
    return ndimage.map_coordinates(volume, index, order=1, mode="constant", cval=0.0, prefilter=False)


# ----------------------------------------------------------------------------------------------------------------
# Tumour
# ----------------------------------------------------------------------------------------------------------------


def _soft_inside(distance: np.ndarray, radius, width: float) -> np.ndarray:
    """Partial-volume membership of ``distance < radius`` with a logistic edge of ``width`` mm."""
    return (1.0 / (1.0 + np.exp(np.clip((distance - radius) / width, -30, 30)))).astype(np.float32)


def _pick_centre(rng: np.random.Generator, grid: np.ndarray, template_points: np.ndarray, anatomy: _Anatomy):
    """A random output-space point in deep white matter, above the cerebellum when possible."""
    wm = _sample(anatomy.wm, template_points, anatomy.spacing)
    depth = _sample(anatomy.depth, template_points, anatomy.spacing)
    # Template z (mm) of the sampled point: gliomas are mostly supratentorial, i.e. above the tentorium (~-15 mm).
    world_z = template_points[2] + np.float32(_MNI_FOV[2] / 2.0 + _MNI_ORIGIN[2] - 0.5)
    deep = wm > 0.6
    if not deep.any():
        return None
    margin = min(25.0, 0.8 * float(depth[deep].max()))
    candidates = deep & (depth >= margin)
    if (candidates & (world_z > -15.0)).any():
        candidates &= world_z > -15.0
    flat = np.flatnonzero(candidates)
    pick = flat[rng.integers(len(flat))]
    # Sub-voxel jitter so that the centre does not sit on the grid.
    jitter = rng.uniform(-0.5, 0.5, size=3) * anatomy.spacing
    return grid.reshape(3, -1)[:, pick].astype(np.float64) + jitter


def _tumour(rng, grid, centre, sizes, tissue_wm_fraction, spacing) -> _Tumour:
    """Soft maps of core, enhancing rim and oedema around ``centre`` (all mm in output space)."""
    core_radius, rim, oedema_extent = sizes
    # Ellipsoidal, randomly oriented: gliomas are rarely spheres.
    axes = rng.uniform(0.8, 1.25, size=3)
    axes /= np.prod(axes) ** (1.0 / 3.0)
    inverse = np.diag(1.0 / axes) @ _rotation(rng, 180.0).T
    distance = np.sqrt(np.sum(_apply_linear(inverse, grid - centre.astype(np.float32).reshape(3, 1, 1, 1)) ** 2, 0))
    bumps = _smooth_noise(rng, grid.shape[1:], corr_mm=14.0, count=3)

    width = float(0.25 * spacing.mean())
    vmax = float(spacing.max())
    core_distance = distance * (1.0 + 0.12 * np.clip(bumps[0], -2.5, 2.5))
    # Rim thickness varies but never drops below one voxel, so label 3 is always resolvable on the grid.
    rim_local = np.maximum(rim * (1.0 + 0.35 * np.clip(bumps[1], -2.5, 2.5)), 1.05 * vmax)
    core = _soft_inside(core_distance, core_radius, width)
    tumour_core = _soft_inside(core_distance, core_radius + rim_local, width)
    # Oedema spreads along white-matter tracts and less into grey matter: its reach scales with the WM fraction.
    oedema_distance = distance * (1.0 + 0.3 * np.clip(bumps[2], -2.5, 2.5))
    oedema_reach = (core_radius + rim + oedema_extent) * (0.6 + 0.55 * tissue_wm_fraction)
    oedema = np.clip(_soft_inside(oedema_distance, oedema_reach, width) - tumour_core, 0.0, 1.0)
    # The noisy reach can leave specks of oedema detached from the tumour; keep only what touches the solid part.
    components, _ = ndimage.label(oedema + tumour_core > 0.5)
    attached = np.isin(components, np.unique(components[tumour_core > 0.5]))
    oedema *= ndimage.binary_dilation(attached & (components > 0))  # dilated: keep the partial-volume edge
    return _Tumour(core=core, enhancing=np.clip(tumour_core - core, 0.0, 1.0), oedema=oedema)


def _tumorous_anatomy(rng: np.random.Generator, anatomy: _Anatomy, size_scale: float = 1.0) -> np.ndarray | None:
    """Deform the anatomy, add a tumour with mass effect, return class fractions ``(7, D, H, W)``.

    Classes are ``[background, *_TISSUES]``; fractions sum to one in every voxel. ``None`` if no white matter
    was found for the tumour (the caller draws again).
    """
    shape = anatomy.gm.shape
    grid = _grid_mm(shape)
    warp = _deformation(rng, shape)
    centre = _pick_centre(rng, grid, warp(grid), anatomy)
    if centre is None:
        return None

    # Sizes in mm, with floors in voxels so that small grids still resolve every compartment. The scale multiplies
    # the draws (not the bounds given to the generator), so the random stream is the same at every scale.
    vmax = float(anatomy.spacing.max())
    core_radius = max(rng.uniform(7.0, 14.0) * size_scale, 1.6 * vmax)
    rim = max(rng.uniform(3.0, 5.5) * size_scale, 1.2 * vmax)
    oedema_extent = rng.uniform(6.0, 16.0) * size_scale
    strength = rng.uniform(0.3, 0.6)

    # Mass effect first: the tumour occupies space the displaced tissue used to fill.
    points = warp(_mass_effect(grid, centre.astype(np.float32), strength, 1.2 * (core_radius + rim)))
    gm, wm, csf, brain = (
        _sample(v, points, anatomy.spacing) for v in (anatomy.gm, anatomy.wm, anatomy.csf, anatomy.brain)
    )
    parenchyma = gm + wm
    tumour = _tumour(
        rng, grid, centre, (core_radius, rim, oedema_extent), wm / np.maximum(parenchyma, 1e-3), anatomy.spacing
    )

    # The solid tumour replaces every tissue inside the brain; oedema is water in GM/WM, not in CSF spaces.
    solid = tumour.core + tumour.enhancing
    oedema = tumour.oedema * parenchyma
    keep_parenchyma = 1.0 - solid - tumour.oedema
    fractions = np.stack(
        [
            1.0 - brain,
            csf * (1.0 - solid),
            gm * keep_parenchyma,
            wm * keep_parenchyma,
            oedema,
            tumour.core * brain,
            tumour.enhancing * brain,
        ]
    )
    return np.clip(fractions, 0.0, 1.0, out=fractions)


# ----------------------------------------------------------------------------------------------------------------
# Contrasts and acquisition
# ----------------------------------------------------------------------------------------------------------------


def _contrasts(
    rng: np.random.Generator, fractions: np.ndarray, anatomy: _Anatomy, contrast_scale: float = 1.0
) -> np.ndarray:
    """Noise-free images ``(4, D, H, W)``: partial-volume mix of per-tissue intensities with texture."""
    shape = fractions.shape[1:]
    # Scanners and subjects differ a little in tissue contrast; +-4 % keeps every intended ordering.
    means = _CONTRAST * rng.uniform(0.96, 1.04, size=_CONTRAST.shape).astype(np.float32)
    if contrast_scale != 1.0:  # skipped at 1.0: the power and the exp/log round trip would not be bit-exact
        # A power about the geometric mean per modality keeps every intensity positive and every ordering.
        centre = np.exp(np.log(means).mean(axis=0, keepdims=True))
        means = (centre * (means / centre) ** contrast_scale).astype(np.float32)
    # Tumours are heterogeneous (necrosis, cysts, cellularity) at a few mm; normal tissue only slightly.
    texture = _smooth_noise(rng, shape, corr_mm=6.0, count=2)
    tumour_texture = 1.0 + 0.10 * np.clip(texture[0], -2.5, 2.5)
    tissue_texture = 1.0 + 0.03 * np.clip(texture[1], -2.5, 2.5)
    images = np.zeros((4, *shape), dtype=np.float32)
    for k in range(len(_TISSUES)):
        tissue_fraction = fractions[k + 1] * (tumour_texture if k >= 3 else tissue_texture)
        for m in range(4):
            images[m] += means[k, m] * tissue_fraction
    return images


def _bias_field(rng: np.random.Generator, grid: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """Smooth multiplicative field (RF inhomogeneity): exp of a random quadratic polynomial, about +-15 % times
    ``strength``."""
    u = grid / np.float32(_MNI_FOV.max() / 2.0)  # roughly [-1, 1]
    terms = [u[0], u[1], u[2], u[0] * u[1], u[0] * u[2], u[1] * u[2], u[0] ** 2, u[1] ** 2, u[2] ** 2]
    coeffs = (rng.normal(0.0, 0.12, size=len(terms)) * strength).astype(np.float32)
    log_field = sum(c * t for c, t in zip(coeffs, terms))
    return np.exp(log_field - log_field.mean()).astype(np.float32)


def _acquire(
    rng: np.random.Generator, images: np.ndarray, anatomy: _Anatomy, variation: _Variation = _DEFAULT_VARIATION
) -> np.ndarray:
    """Bias field, Rician noise and scanner gain per modality; returns float32 ``(D, H, W, 4)`` (MSD layout)."""
    grid = _grid_mm(images.shape[1:])
    out = np.empty((*images.shape[1:], images.shape[0]), dtype=np.float32)
    for m in range(images.shape[0]):
        signal = images[m] * _bias_field(rng, grid, variation.bias_field_strength)
        # Magnitude images: |signal + complex Gaussian noise| is Rician; the background becomes Rayleigh, not 0.
        sigma = np.float32(rng.uniform(0.015, 0.035) * variation.noise_scale)
        real = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
        imag = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
        # Arbitrary scanner units, different per modality and case, as in MSD (models must normalise).
        gain = np.float32(rng.uniform(600.0, 1400.0) * variation.intensity_scale)
        out[..., m] = gain * np.sqrt(real * real + imag * imag)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def _dataset_index(
    training: list[dict], shape: tuple[int, int, int], seed: int, variation: _Variation = _DEFAULT_VARIATION
) -> dict:
    phantom = {"shape": list(shape), "seed": seed}
    if variation != _DEFAULT_VARIATION:  # only when used, so that a default data set's index stays as it was
        phantom["variation"] = variation._asdict()
    return {
        "name": "SplitUNetPhantom",
        "description": "Synthetic multi-modal brain-tumour MRI (MNI ICBM152 2009a anatomy, simulated glioma) "
        "in the MSD Task01_BrainTumour layout",
        "reference": "splitunet.data.phantom; anatomy: MNI ICBM152 2009a templates shipped with nilearn",
        "licence": "synthetic data; MNI ICBM152 template terms apply to the anatomy",
        "tensorImageSize": "4D",
        "modality": {str(i): name for i, name in enumerate(PHANTOM_MODALITIES)},
        "labels": {str(k): v for k, v in PHANTOM_LABELS.items()},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
        "phantom": phantom,
    }


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a NIfTI-1 file atomically with qform and sform both set to ``affine`` (mm, RAS)."""
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    with atomic_path(path, suffix=".nii.gz") as tmp:  # nibabel picks gzip from the suffix
        nib.save(image, tmp)
