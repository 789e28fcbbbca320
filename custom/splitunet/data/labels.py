"""Label layouts of the brain-tumour datasets and their mapping to the overlapping BraTS regions.

Each dataset numbers the tumour sub-regions differently (docs/design.md, "Labels and layouts"), so every mapping is
spelled out here and tested per layout rather than inferred. The network predicts the overlapping regions
``protocol.REGIONS = ("TC", "WT", "ET")``; :func:`labels_to_regions` builds those targets from a label volume and
:func:`regions_to_labels` turns predicted regions back into a label volume in the dataset's own convention.

Note: the MONAI BraTS tutorial maps "ET = label 2" for MSD Task01; in MSD Task01 label 2 is the non-enhancing
tumour and the enhancing tumour is label 3.
"""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike

import numpy as np

from splitunet.errors import SplitUNetDataError
from splitunet.wire.protocol import REGIONS

__all__ = [
    "LabelLayout",
    "LAYOUTS",
    "get_layout",
    "validate_labels",
    "labels_to_regions",
    "regions_to_labels",
]

# How many offending values an error message lists before it says "...".
_MAX_LISTED = 10


@dataclass(frozen=True)
class LabelLayout:
    """How one dataset numbers its labels, and which labels make up each BraTS region.

    Args:
        name: layout name as job settings use it (a key of :data:`LAYOUTS`).
        label_names: every allowed label value, background 0 included, with a readable name.
        regions: for each of ``"TC"``, ``"WT"``, ``"ET"`` the label values the region is made of.

    The regions must nest (ET within TC within WT) and each of "WT minus TC", "TC minus ET" and "ET" must be
    exactly one label, so that predicted regions map back to labels without ambiguity.
    """

    name: str
    label_names: dict[int, str]
    regions: dict[str, tuple[int, ...]]

    def __post_init__(self):
        if 0 not in self.label_names:
            raise ValueError(f"layout {self.name!r}: label_names must include background 0")
        if set(self.regions) != set(REGIONS):
            raise ValueError(f"layout {self.name!r}: regions must be exactly {REGIONS}, got {sorted(self.regions)}")
        tc, wt, et = (set(self.regions[r]) for r in ("TC", "WT", "ET"))
        if not (et <= tc <= wt):
            raise ValueError(f"layout {self.name!r}: regions must nest ET within TC within WT")
        if 0 in wt or not wt <= set(self.label_names):
            raise ValueError(f"layout {self.name!r}: region labels must be non-background labels of the layout")
        for part, what in ((wt - tc, "WT minus TC"), (tc - et, "TC minus ET"), (et, "ET")):
            if len(part) != 1:
                raise ValueError(f"layout {self.name!r}: {what} must be exactly one label, got {sorted(part)}")

    @property
    def oedema_label(self) -> int:
        """Label of voxels in WT but not TC (oedema)."""
        return next(iter(set(self.regions["WT"]) - set(self.regions["TC"])))

    @property
    def core_label(self) -> int:
        """Label of voxels in TC but not ET (necrosis / non-enhancing tumour)."""
        return next(iter(set(self.regions["TC"]) - set(self.regions["ET"])))

    @property
    def enhancing_label(self) -> int:
        """Label of enhancing-tumour voxels (ET)."""
        return self.regions["ET"][0]

    @property
    def allowed_values(self) -> tuple[int, ...]:
        """All valid label values, sorted."""
        return tuple(sorted(self.label_names))


LAYOUTS: dict[str, LabelLayout] = {
    "msd": LabelLayout(
        name="msd",
        label_names={0: "background", 1: "oedema", 2: "non-enhancing tumour", 3: "enhancing tumour"},
        regions={"TC": (2, 3), "WT": (1, 2, 3), "ET": (3,)},
    ),
    "brats2021": LabelLayout(
        name="brats2021",
        label_names={
            0: "background",
            1: "necrotic tumour core (NCR)",
            2: "peritumoral oedema (ED)",
            4: "enhancing tumour (ET)",
        },
        regions={"TC": (1, 4), "WT": (1, 2, 4), "ET": (4,)},
    ),
    "brats2023": LabelLayout(
        name="brats2023",
        label_names={
            0: "background",
            1: "necrotic tumour core (NCR)",
            2: "peritumoral oedema (ED)",
            3: "enhancing tumour (ET)",
        },
        regions={"TC": (1, 3), "WT": (1, 2, 3), "ET": (3,)},
    ),
}


def get_layout(name: str | LabelLayout) -> LabelLayout:
    """Look up a layout by name (a :class:`LabelLayout` is returned unchanged).

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    if isinstance(name, LabelLayout):
        return name
    try:
        return LAYOUTS[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown label layout {name!r}; known layouts: {', '.join(sorted(LAYOUTS))}") from None


def _listed(values) -> str:
    values = [v.item() if hasattr(v, "item") else v for v in values]
    shown = ", ".join(repr(v) for v in values[:_MAX_LISTED])
    return shown + (f", ... ({len(values)} in all)" if len(values) > _MAX_LISTED else "")


def validate_labels(
    label: np.ndarray,
    layout: str | LabelLayout,
    *,
    party: str | None = None,
    case: str | None = None,
    file: str | PathLike | None = None,
) -> np.ndarray:
    """Check that every voxel holds a label of ``layout`` and return the labels as ``uint8``.

    Label volumes often come back from NIfTI as floats, so values are checked to be finite whole numbers before
    they are compared with the layout; a value outside the layout is an error, never silently background.

    Args:
        label: label volume of any shape (usually ``(D, H, W)``), integer or float.
        layout: layout name or :class:`LabelLayout`.
        party, case, file: where the volume came from, for the error message.

    Returns:
        the labels, same shape, ``uint8``.

    Raises:
        SplitUNetDataError: non-finite or non-integer values, or values the layout does not define.
    """
    layout = get_layout(layout)
    label = np.asarray(label)
    where = {"party": party, "case": case, "file": file}
    if label.dtype.kind not in "biuf":
        raise SplitUNetDataError(f"label volume has unsupported data type {label.dtype}", **where)
    if label.dtype.kind == "f":
        finite = np.isfinite(label)
        if not finite.all():
            bad = int(label.size - np.count_nonzero(finite))
            raise SplitUNetDataError(f"label volume has {bad} non-finite voxels (NaN or Inf)", **where)
        fractional = label != np.round(label)
        if fractional.any():
            examples = np.unique(label[fractional])
            raise SplitUNetDataError(
                f"label volume has {int(np.count_nonzero(fractional))} voxels with non-integer values "
                f"({_listed(examples)}); layout {layout.name!r} allows {_listed(layout.allowed_values)}",
                **where,
            )
    values = np.unique(label)
    unexpected = values[~np.isin(values, layout.allowed_values)]
    if unexpected.size:
        unexpected = unexpected.astype(np.int64) if label.dtype.kind == "f" else unexpected
        raise SplitUNetDataError(
            f"label values {_listed(unexpected)} are not in layout {layout.name!r} "
            f"(allowed: {_listed(layout.allowed_values)})",
            **where,
        )
    return label.astype(np.uint8, copy=False)


def labels_to_regions(
    label: np.ndarray,
    layout: str | LabelLayout,
    *,
    party: str | None = None,
    case: str | None = None,
    file: str | PathLike | None = None,
) -> np.ndarray:
    """Turn a label volume into the overlapping region masks the network is trained on.

    Args:
        label: label volume ``(*spatial)`` in the layout's numbering (integer or whole-number float).
        layout: layout name or :class:`LabelLayout`.
        party, case, file: where the volume came from, for the error message.

    Returns:
        ``uint8`` masks of shape ``(3, *spatial)``, channels in the order of ``protocol.REGIONS`` (TC, WT, ET).

    Raises:
        SplitUNetDataError: see :func:`validate_labels`.
    """
    layout = get_layout(layout)
    label = validate_labels(label, layout, party=party, case=case, file=file)
    regions = np.empty((len(REGIONS), *label.shape), dtype=np.uint8)
    for channel, region in enumerate(REGIONS):
        regions[channel] = np.isin(label, layout.regions[region])
    return regions


def regions_to_labels(regions: np.ndarray, layout: str | LabelLayout, threshold: float = 0.5) -> np.ndarray:
    """Turn region masks or probabilities back into a label volume in the layout's numbering.

    Predicted regions need not nest, so nesting is imposed from the inside out: a voxel in ET is enhancing
    tumour, else a voxel in TC is tumour core (NCR / non-enhancing), else a voxel in WT is oedema, else background.

    Args:
        regions: ``(3, *spatial)`` masks or sigmoid probabilities, channels in ``protocol.REGIONS`` order.
        layout: layout name or :class:`LabelLayout`.
        threshold: a region is present where its value is ``>= threshold`` (as MONAI's ``AsDiscrete``).

    Returns:
        ``uint8`` label volume of shape ``(*spatial)``.
    """
    layout = get_layout(layout)
    regions = np.asarray(regions)
    if regions.ndim < 2 or regions.shape[0] != len(REGIONS):
        raise ValueError(f"regions must have shape ({len(REGIONS)}, *spatial), got {regions.shape}")
    present = {region: regions[channel] >= threshold for channel, region in enumerate(REGIONS)}
    labels = np.zeros(regions.shape[1:], dtype=np.uint8)
    # Later assignments win, so ET overrides TC overrides WT.
    labels[present["WT"]] = layout.oedema_label
    labels[present["TC"]] = layout.core_label
    labels[present["ET"]] = layout.enhancing_label
    return labels
