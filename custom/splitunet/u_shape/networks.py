"""The U-shaped three-part split of MONAI's BasicUNet: head and tail at the hospital, the middle at the server.

Yang et al., "RoS-FL: Robust split federated learning for U-shaped medical image networks" (U-shaped split
learning): the hospital keeps the first encoder block, which sees the image, and the last decoder block and head,
which see the labels through the loss; the server runs everything in between. The head's output ``x0`` goes both
to the server (the middle's input) and, inside the hospital, to the tail as its full-resolution skip; the skip's
share of the gradient of ``x0`` never leaves the hospital.

Parameter names equal BasicUNet's (``conv_0``, ``down_1``..``down_4``, ``upcat_4``..``upcat_1``, ``final_conv``),
so a BasicUNet state dict splits into the three parts by name (:func:`split_basic_unet_state`), and the parts
composed are BasicUNet's forward and autograd.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from monai.networks.layers.factories import Conv
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat
from torch import nn

from splitunet.networks.initialisation import redraw_convolutions
from splitunet.networks.layers import DEFAULT_ACT, DEFAULT_NORM
from splitunet.u_shape.config import six_features

__all__ = [
    "PARTS",
    "UShapeHead",
    "UShapeMiddle",
    "UShapeTail",
    "split_basic_unet_state",
    "seeded_part",
]

# The three parts, in forward order (head and tail are also the ``part`` names of the averaging and of DWCS).
PARTS = ("head", "middle", "tail")
# BasicUNet's input channels here: the four MRI modalities, all held by one hospital.
IN_CHANNELS = 4
_SPATIAL_DIMS = 3


class UShapeHead(nn.Module):
    """BasicUNet's ``conv_0`` on the hospital's four modalities: image ``(B, 4, D, H, W)`` -> ``x0``.

    Args:
        features: BasicUNet's feature sizes (5 or 6 ints); the head uses the first.
        in_channels: input channels (the four modalities).
    """

    def __init__(self, features: Sequence[int], in_channels: int = IN_CHANNELS):
        super().__init__()
        fea = six_features(features)
        self.conv_0 = TwoConv(_SPATIAL_DIMS, in_channels, fea[0], DEFAULT_ACT, DEFAULT_NORM, True, 0.0)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``x0``: ``features[0]`` channels at full resolution."""
        return self.conv_0(image)


class UShapeMiddle(nn.Module):
    """BasicUNet's ``down_1..down_4`` and ``upcat_4..upcat_2``: ``x0`` -> ``u2`` (1/2 resolution).

    The skips ``x1``..``x3`` stay inside the middle; only ``x0`` comes in and ``u2`` goes out.

    Args:
        features: BasicUNet's feature sizes (5 or 6 ints).
    """

    def __init__(self, features: Sequence[int]):
        super().__init__()
        fea = six_features(features)
        block = (DEFAULT_ACT, DEFAULT_NORM, True, 0.0)
        self.down_1 = Down(_SPATIAL_DIMS, fea[0], fea[1], *block)
        self.down_2 = Down(_SPATIAL_DIMS, fea[1], fea[2], *block)
        self.down_3 = Down(_SPATIAL_DIMS, fea[2], fea[3], *block)
        self.down_4 = Down(_SPATIAL_DIMS, fea[3], fea[4], *block)
        self.upcat_4 = UpCat(_SPATIAL_DIMS, fea[4], fea[3], fea[3], *block, "deconv")
        self.upcat_3 = UpCat(_SPATIAL_DIMS, fea[3], fea[2], fea[2], *block, "deconv")
        self.upcat_2 = UpCat(_SPATIAL_DIMS, fea[2], fea[1], fea[1], *block, "deconv")

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        """``u2``: ``features[1]`` channels at the resolution of ``x1`` (``x0`` halved, rounded down)."""
        x1 = self.down_1(x0)
        x2 = self.down_2(x1)
        x3 = self.down_3(x2)
        x4 = self.down_4(x3)
        u4 = self.upcat_4(x4, x3)
        u3 = self.upcat_3(u4, x2)
        return self.upcat_2(u3, x1)


class UShapeTail(nn.Module):
    """BasicUNet's ``upcat_1`` (with the hospital's own skip ``x0``) and ``final_conv``: ``(u2, x0)`` -> logits.

    Args:
        features: BasicUNet's feature sizes (5 or 6 ints).
        out_channels: output channels (3: TC, WT, ET logits for sigmoid).
    """

    def __init__(self, features: Sequence[int], out_channels: int = 3):
        super().__init__()
        fea = six_features(features)
        block = (DEFAULT_ACT, DEFAULT_NORM, True, 0.0)
        self.upcat_1 = UpCat(_SPATIAL_DIMS, fea[1], fea[0], fea[5], *block, "deconv", halves=False)
        self.final_conv = Conv["conv", _SPATIAL_DIMS](fea[5], out_channels, kernel_size=1)

    def forward(self, u2: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, out_channels, *x0's spatial size)``."""
        return self.final_conv(self.upcat_1(u2, x0))


_PART_CLASSES = {"head": UShapeHead, "middle": UShapeMiddle, "tail": UShapeTail}
# Offsets each part's seed, so that the parts do not draw the same numbers.
_SEED_OFFSET = {"head": 0, "middle": 1, "tail": 2}


def seeded_part(part: str, features: Sequence[int], seed: int) -> nn.Module:
    """A part with initial weights drawn from every bit of ``seed`` (offset by part), without touching torch's
    global random state (:func:`~splitunet.networks.initialisation.redraw_convolutions`).

    Every hospital builds the same head and tail from the job's seed: federated averaging starts from one model.
    """
    if part not in _PART_CLASSES:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    with torch.random.fork_rng(devices=[]):
        module = _PART_CLASSES[part](features)
    return redraw_convolutions(module, int(seed) + _SEED_OFFSET[part])


def split_basic_unet_state(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A BasicUNet state dict as the three parts' state dicts, by part (names are BasicUNet's).

    Raises:
        ValueError: an entry belongs to no part.
    """
    owners = {
        "head": ("conv_0",),
        "middle": ("down_1", "down_2", "down_3", "down_4", "upcat_4", "upcat_3", "upcat_2"),
        "tail": ("upcat_1", "final_conv"),
    }
    parts: dict[str, dict[str, torch.Tensor]] = {part: {} for part in PARTS}
    for name, tensor in state.items():
        part = next((p for p, blocks in owners.items() if name.split(".", 1)[0] in blocks), None)
        if part is None:
            raise ValueError(f"BasicUNet entry {name!r} belongs to no part of the U-shaped split")
        parts[part][name] = tensor
    return parts
