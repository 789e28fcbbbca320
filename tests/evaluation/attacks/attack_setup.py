"""Settings and helpers shared by the attack tests (imported by name, like ``tests/e2e/tiny_job.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from splitunet.data.sampling import extract_crop

FEATURES = (8, 16, 32, 64, 128)  # the demo job's encoder (README: features 8/16/32/64/128)
SHAPE = (48, 48, 48)  # phantom volumes
CROP = (32, 32, 32)  # crops the server plans
ORIGIN = (8, 8, 8)  # the attacked crop: the centre of the volume, i.e. inside the brain
NUM_CASES = 6
TARGET_CASE = "BRATS_001"  # the attacked site's case; the others are the attacker's auxiliary cases
ENCODER_SEED = 0

# No-defense white-box inversion of x0 (measured SSIM 0.896, 0.894, 0.895 for seeds 0, 1, 2; 3.5 s each).
WHITE_BOX_X0 = {"iterations": 60, "lr": 0.1, "tv_weight": 0.1, "seed": 0}


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread inside the block, then restore the setting.

    On the busy 2-core development machine, two torch threads competing with other jobs made a 3D convolution
    step up to 5x slower than one thread (measured: 100 inversion steps 48 s vs 10 s).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def crop_tensor(volume: np.ndarray, origin=ORIGIN, size=CROP) -> torch.Tensor:
    """``(D, H, W)`` or ``(C, D, H, W)`` volume -> ``(1, C, d, h, w)`` float32 crop (``extract_crop``, no flips)."""
    crop = extract_crop(volume, origin, size)
    crop = crop[None] if crop.ndim == 3 else crop
    return torch.from_numpy(crop.astype(np.float32))[None]


def tumour_origin(regions: np.ndarray, size=CROP) -> list[int]:
    """Origin of a crop centred on the whole tumour (test set-up only: real sampling never looks at labels)."""
    centre = np.argwhere(regions[1] > 0).mean(0).round().astype(int)
    return np.clip(centre - np.array(size) // 2, 0, np.array(regions.shape[1:]) - np.array(size)).tolist()


def first_step_gradients(images: torch.Tensor, targets: torch.Tensor, seed: int = 0) -> list[dict[int, torch.Tensor]]:
    """The gradients each site receives at the first training iteration: fresh encoders and decoder, the server's
    DiceCE loss on ``targets``; ``images`` holds one channel per site, in ``MODALITIES`` order.

    Returns:
        per site, level -> the gradient of its features, as ``ServerTrainer.train_step`` hands them back.
    """
    from splitunet.networks import ServerDecoder, SiteEncoder
    from splitunet.networks.losses import make_loss

    sites = images.shape[1]
    with torch.random.fork_rng(devices=[]), one_thread():
        torch.manual_seed(seed)
        encoders = [SiteEncoder(1, FEATURES) for _ in range(sites)]
        decoder = ServerDecoder(sites, FEATURES)
        # As ServerTrainer.train_step: the received features are leaves, their .grad is what each site gets back.
        leaves = []
        for channel, encoder in enumerate(encoders):
            with torch.no_grad():
                features = encoder(images[:, channel : channel + 1])
            leaves.append({level: t.requires_grad_(True) for level, t in enumerate(features)})
        make_loss("dice_ce")(decoder(leaves), targets).backward()
    return [{level: t.grad for level, t in site.items()} for site in leaves]


def run_filters(filters, features: dict[int, torch.Tensor]) -> tuple[dict[int, torch.Tensor], list]:
    """Activations through real privacy filters as FLARE runs them (``process`` on a DXO).

    Returns:
        ``(features as the server decodes them, the DXO's filter trail)``: what ``CaptureFeatures`` records.
    """
    from nvflare.apis.dxo import from_shareable
    from nvflare.apis.fl_context import FLContext

    from splitunet.wire.protocol import DataKind, MetaKey
    from splitunet.wire.transport import dxo_to_features, features_to_dxo, register_tensor_support

    register_tensor_support()
    shareable = features_to_dxo(features, DataKind.ACTIVATIONS, {"iteration": 1}).to_shareable()
    for one in filters:
        shareable = one.process(shareable, FLContext())
    dxo = from_shareable(shareable)
    return dxo_to_features(dxo, DataKind.ACTIVATIONS), dxo.meta[MetaKey.FILTER_TRAIL]
