"""What sites and server agree on: task names, DXO data kinds and keys, modalities.

Site-side and server-side code both import this module and never each other.
"""

from __future__ import annotations

__all__ = [
    "MODALITIES",
    "MSD_CHANNEL_ORDER",
    "REGIONS",
    "NUM_LEVELS",
    "level_key",
    "level_index",
    "TaskName",
    "DataKind",
    "MetaKey",
    "SITE_ERROR_HEADER",
    "LABELS_PARTY",
]

# Modality names as folder names and site settings use them.
MODALITIES = ("flair", "t1", "t1gd", "t2")
# MSD Task01_BrainTumour stores the four modalities as channels of one 4D NIfTI in this order.
MSD_CHANNEL_ORDER = ("flair", "t1", "t1gd", "t2")
# Output channels of the decoder head (overlapping BraTS regions): tumour core, whole tumour, enhancing tumour.
REGIONS = ("TC", "WT", "ET")
# BasicUNet encoder levels x0 (full resolution) .. x4 (1/16, the bottleneck).
NUM_LEVELS = 5
# Folder name of the label holder's partition.
LABELS_PARTY = "labels"


def level_key(level: int) -> str:
    """Name of a skip level in a DXO, e.g. ``0 -> "x0"``."""
    if not 0 <= int(level) < NUM_LEVELS:
        raise ValueError(f"skip level must be in 0..{NUM_LEVELS - 1}, got {level}")
    return f"x{int(level)}"


def level_index(key: str) -> int:
    """Inverse of :func:`level_key`."""
    if not (isinstance(key, str) and key.startswith("x") and key[1:].isdigit()):
        raise ValueError(f"not a level key: {key!r}")
    level = int(key[1:])
    level_key(level)  # validates the range
    return level


class TaskName:
    """FLARE task names (Controller.send on the server, Executor.execute at the sites)."""

    SETUP = "split_setup"  # site reports modality and keyed case list; builds its encoder
    STEP = "split_step"  # apply gradients of step t (if any), then forward the crops of step t+1 (if any)
    ENCODE = "split_encode"  # inference forward of given windows, no gradient kept
    SAVE = "split_save"  # save the site's encoder checkpoint ("best"/"last")
    # Sites sharing a modality: apply gradients (if any) and send the encoder's weights, or take their average.
    AVERAGE = "split_average"


class DataKind:
    """DXO data kinds. FLARE has no built-in kind for activations, so these are ours."""

    ACTIVATIONS = "splitunet_activations"  # site -> server: encoder features by level key
    GRADIENTS = "splitunet_gradients"  # server -> site: d loss / d features by level key
    CONTROL = "splitunet_control"  # no tensors: setup, plans, acknowledgements


class MetaKey:
    """Keys of DXO meta dictionaries."""

    ITERATION = "iteration"
    PLAN = "plan"  # crop plan for the forward pass: keys, origins, size, flips
    CONFIG = "config"  # model configuration sent with the setup task
    MODALITY = "modality"
    CASES = "cases"  # {case_key: {"shape": [D, H, W], "affine_digest": str}}
    SITE_COMPUTE_S = "site_compute_s"
    TAG = "tag"
    SAVED_PATH = "saved_path"
    EXPERIMENT = "experiment"  # names the checkpoint folder of a run (setup task)
    RESUME = "resume"  # {"iteration": N}: load the "last" checkpoints, written at iteration N (setup task)
    INFERENCE = "inference"  # {"tag": "best"}: load that encoder checkpoint and encode new cases (setup task)
    HEADERS = "headers"  # {case_key: NIfTI header without voxels or free text} (inference setup reply)
    FILTER_TRAIL = "splitunet_filters"  # what each privacy filter did to this DXO (data-independent facts only)
    BLOCKED_LEVELS = "splitunet_blocked_levels"  # skip levels a site's policy never sends (on its setup reply)
    FEDPROX_MU = "fedprox_mu"  # FedProx's mu, with a SplitFed average that is the site's proximal anchor (> 0 only)


# Shareable header carrying a site's error message to the server.
SITE_ERROR_HEADER = "splitunet_site_error"
