"""The benchmark's data: phantom cases split per party, keyed as the sites key them, and one train/validation split.

The folders have the layout of :func:`splitunet.tools.demo.ensure_partitioned_phantom` (``phantom_msd/``, ``parties/``,
``case_key_secret.txt``), so the FLARE runs of the benchmark train and validate on the very same cases. This module
does not import the demo, which needs nvflare: the GPU machine runs the in-process parts without it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from splitunet.data.case_keys import keys_to_case_ids, read_or_create_secret
from splitunet.data.partition import partition_msd
from splitunet.data.party_data import LabelFolder, ModalityFolder
from splitunet.data.phantom import generate_phantom
from splitunet.wire.protocol import LABELS_PARTY

__all__ = ["BenchData", "prepare_bench_data", "SECRET_FILE"]

# Name of the case-key secret beside the partition, as the demo names it (it reads the same file).
SECRET_FILE = "case_key_secret.txt"


@dataclass
class BenchData:
    """Partitioned phantom data and the case split every arm of the benchmark uses.

    Attributes:
        data_dir: folder holding ``phantom_msd/``, ``parties/`` and the secret.
        parties: the partition (one folder per modality, ``labels/``).
        secret: the case-key secret the data holders share.
        train_keys: keyed training cases, sorted.
        val_keys: keyed held-out cases, sorted.
        shapes: spatial shape per key.
        volume_shape: the phantom's grid.
    """

    data_dir: Path
    parties: Path
    secret: str
    train_keys: list[str]
    val_keys: list[str]
    shapes: dict[str, tuple[int, int, int]]
    volume_shape: tuple[int, int, int]

    def modality_folder(self, modality: str, max_cached: int | None = None) -> ModalityFolder:
        """A site's view of its modality."""
        return ModalityFolder(self.parties / modality, modality, party=f"bench-{modality}", max_cached=max_cached)

    def label_folder(self) -> LabelFolder:
        """The label holder's view."""
        return LabelFolder(self.parties / LABELS_PARTY, party="bench-server")


def _matches(source: Path, cases: int, shape: Sequence[int], seed: int) -> bool:
    index = source / "dataset.json"
    if not index.is_file():
        return False
    content = json.loads(index.read_text())
    phantom = content.get("phantom", {})
    return content.get("numTraining") == cases and phantom.get("shape") == list(shape) and phantom.get("seed") == seed


def prepare_bench_data(
    data_dir: str | Path, cases: int, shape: Sequence[int], seed: int, num_val_cases: int, progress: bool = True
) -> BenchData:
    """Generate (or reuse, if made with the same arguments) phantom cases, partition them, split train/validation.

    The split follows the FLARE controller's rule (a seeded permutation of the sorted common keys, the first
    ``num_val_cases`` held out), so with the shared secret the simulator validates on the same cases.

    Args:
        data_dir: where the data goes.
        cases: number of phantom cases.
        shape: phantom grid ``(D, H, W)``.
        seed: phantom and split seed.
        num_val_cases: held-out cases (at least one case stays for training).
        progress: show progress bars.
    """
    data_dir = Path(data_dir).resolve()
    source, parties = data_dir / "phantom_msd", data_dir / "parties"
    shape = tuple(int(s) for s in shape)
    if not _matches(source, cases, shape, seed):
        # Stale cases of another size would silently change what is measured: start over.
        for folder in (source, parties):
            if folder.exists():
                shutil.rmtree(folder)
        generate_phantom(source, cases, shape=shape, seed=seed, progress=progress)
    if not (parties / LABELS_PARTY).is_dir():
        partition_msd(source, parties, progress=progress)
    secret = read_or_create_secret(data_dir / SECRET_FILE)  # the demo's own secret file, when it made this data

    labels = LabelFolder(parties / LABELS_PARTY, party="bench-server")
    key_to_case = keys_to_case_ids(labels.case_ids, secret, party="bench-server")
    keys = sorted(key_to_case)
    shapes = {key: tuple(labels.describe(key_to_case[key])["shape"]) for key in keys}
    order = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
    num_val = max(1, min(int(num_val_cases), len(order) - 1))
    return BenchData(
        data_dir=data_dir,
        parties=parties,
        secret=secret,
        train_keys=sorted(order[num_val:]),
        val_keys=sorted(order[:num_val]),
        shapes=shapes,
        volume_shape=shape,
    )
