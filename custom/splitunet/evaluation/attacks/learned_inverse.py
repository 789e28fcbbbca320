"""Learned inverse: a 3D decoder trained on auxiliary crops of the same modality to map features back to images."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, UpSample
from torch import nn

from splitunet.evaluation.attacks.base import Attack, check_positive, check_positive_int
from splitunet.evaluation.attacks.encoder_access import EncoderPrefix
from splitunet.evaluation.attacks.observed import check_observed, level_sizes, resolve_crop_size
from splitunet.networks import SiteEncoder
from splitunet.networks.layers import DEFAULT_ACT, DEFAULT_NORM
from splitunet.wire.protocol import NUM_LEVELS

__all__ = ["InverseDecoder", "LearnedInverse", "decode_levels"]

# Features of auxiliary crops -> what the attacker expects to observe (e.g. the defense's public settings).
FeatureTransform = Callable[[dict[int, torch.Tensor]], dict[int, torch.Tensor]]


class InverseDecoder(nn.Module):
    """Maps encoder features at chosen levels to a 1-channel image at the input's resolution.

    Starts at the coarsest observed level and climbs to full resolution: at each level one MONAI ``UpSample``
    (transposed convolution, x2) and one ``Convolution`` (conv, instance norm, LeakyReLU), concatenating the
    observed features of that level where there are any (a U-Net decoder whose skips are the observed levels);
    a final 1x1x1 convolution gives the image.

    Args:
        features: the encoder's feature sizes (at least five).
        levels: observed levels fed to the decoder.
        width: channels of the decoder's hidden layers, at most the encoder's at each level (small by default:
            the decoder is trained on few crops).
    """

    def __init__(self, features: Sequence[int], levels: Iterable[int], width: int = 16):
        super().__init__()
        features = tuple(int(f) for f in features)
        self.levels = tuple(sorted({int(level) for level in levels}))
        if len(features) < NUM_LEVELS:
            raise ValueError(f"features must hold at least {NUM_LEVELS} ints, got {features}")
        if not self.levels or any(not 0 <= level < NUM_LEVELS for level in self.levels):
            raise ValueError(f"levels must be a non-empty subset of 0..{NUM_LEVELS - 1}, got {self.levels}")
        width = check_positive_int("width", width)
        coarsest = self.levels[-1]
        hidden = {level: min(width, features[level]) for level in range(coarsest + 1)}
        self.entry = Convolution(3, features[coarsest], hidden[coarsest], act=DEFAULT_ACT, norm=DEFAULT_NORM)
        self.ups = nn.ModuleDict()
        self.convs = nn.ModuleDict()
        for level in range(coarsest - 1, -1, -1):
            self.ups[str(level)] = UpSample(3, hidden[level + 1], hidden[level], scale_factor=2, mode="deconv")
            skip = features[level] if level in self.levels else 0
            self.convs[str(level)] = Convolution(
                3, hidden[level] + skip, hidden[level], act=DEFAULT_ACT, norm=DEFAULT_NORM
            )
        self.head = nn.Conv3d(hidden[0], 1, kernel_size=1)

    def forward(self, observed: Mapping[int, torch.Tensor], crop_size: Sequence[int]) -> torch.Tensor:
        """``observed``: level -> ``(B, features[level], ...)`` for :attr:`levels` -> image ``(B, 1, D, H, W)``."""
        sizes = level_sizes(crop_size)
        h = self.entry(observed[self.levels[-1]])
        for level in range(self.levels[-1] - 1, -1, -1):
            h = _fit(self.ups[str(level)](h), sizes[level])
            if level in self.levels:
                h = torch.cat([h, observed[level]], dim=1)
            h = self.convs[str(level)](h)
        return self.head(h)


def _fit(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Pad (replicate) or crop the far end so that x has spatial ``size`` (odd sizes halve by floor)."""
    pad = []
    for have, want in zip(reversed(x.shape[2:]), reversed(tuple(size))):
        pad += [0, max(want - have, 0)]
    if any(pad):
        x = F.pad(x, pad, mode="replicate")
    return x[(..., *(slice(0, s) for s in size))]


class LearnedInverse(Attack):
    """Train an :class:`InverseDecoder` on (auxiliary crop, encoder features) pairs, then decode observed features.

    He, Zhang and Lee, "Model inversion attacks against collaborative inference", ACSAC 2019 (the inverse
    network): the attacker holds auxiliary images of the same modality (public scans, or other cases) and an
    encoder that behaves like the site's: the site's own weights (white-box) or a surrogate, e.g.
    :attr:`~splitunet.evaluation.attacks.UnSplit.surrogate`
    (black-box). A ``feature_transform`` lets the attacker train on
    what it expects to observe after a defense whose settings are public (the filter trail records them), e.g.
    the same clipping and noise.

    Call :meth:`fit` once, then :meth:`reconstruct` on any number of observations. Defaults are short, for tests
    (a few dozen steps on a few crops); for real use train for thousands of steps on hundreds of crops.

    Args:
        encoder: the attacker's encoder (not trained here).
        levels: the levels the attacker observes (the decoder's inputs).
        width: hidden channels of the decoder.
        steps: Adam steps of :meth:`fit`.
        batch_size: auxiliary crops per step.
        lr: Adam learning rate.
        seed: seed of the decoder's initialisation and of the batch order.
        device: where to train.
    """

    name = "learned_inverse"
    threat_model = "server holds auxiliary images of the modality and an encoder like the site's (known or surrogate)"

    def __init__(
        self,
        encoder: SiteEncoder,
        levels: Iterable[int],
        width: int = 16,
        steps: int = 100,
        batch_size: int = 2,
        lr: float = 3e-3,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ):
        if not isinstance(encoder, SiteEncoder):
            raise ValueError(f"encoder must be a SiteEncoder, got {type(encoder).__name__}")
        self.device = torch.device(device)
        self.levels = tuple(sorted({int(level) for level in levels}))
        self.prefix = EncoderPrefix(encoder, self.levels).to(self.device).eval()
        self.features = encoder.features
        self.steps = check_positive_int("steps", steps)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.lr = check_positive("lr", lr)
        self.seed = int(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.decoder = InverseDecoder(self.features, self.levels, width).to(self.device)
        self.crop_size: tuple[int, int, int] | None = None

    @torch.no_grad()
    def _encode(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        return self.prefix(images.to(self.device))

    def fit(self, images: torch.Tensor, feature_transform: FeatureTransform | None = None) -> dict:
        """Train the decoder to map ``encoder(images)`` (after ``feature_transform``) back to ``images``.

        Args:
            images: auxiliary crops ``(N, 1, D, H, W)`` in the site's intensity normalisation, N >= 1.
            feature_transform: applied to each batch's features before decoding (default: none).

        Returns:
            stats: steps, crops, first and last training MSE, seconds.
        """
        start = time.perf_counter()
        if not isinstance(images, torch.Tensor) or images.dim() != 5 or images.shape[1] != 1 or not len(images):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a non-empty (N, 1, D, H, W) tensor, got {shape}")
        images = images.detach().float()
        self.crop_size = tuple(int(s) for s in images.shape[2:])
        # The encoder is fixed, so the clean features of every crop are computed once.
        features = {level: t.cpu() for level, t in self._encode(images).items()}
        generator = torch.Generator().manual_seed(self.seed)
        optimizer = torch.optim.Adam(self.decoder.parameters(), lr=self.lr)
        self.decoder.train()
        first = None
        for _ in range(self.steps):
            index = torch.randint(len(images), (min(self.batch_size, len(images)),), generator=generator)
            batch = {level: t[index].to(self.device) for level, t in features.items()}
            if feature_transform is not None:
                batch = feature_transform(batch)
            optimizer.zero_grad(set_to_none=True)
            loss = F.mse_loss(self.decoder(batch, self.crop_size), images[index].to(self.device))
            loss.backward()
            optimizer.step()
            first = float(loss.detach()) if first is None else first
        self.decoder.eval()
        return {
            "attack": self.name,
            "steps": self.steps,
            "crops": len(images),
            "train_mse_first": first,
            "train_mse_last": float(loss.detach()),
            "seconds": time.perf_counter() - start,
        }

    @torch.no_grad()
    def reconstruct(
        self, observed: Mapping[int | str, torch.Tensor], crop_size: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, dict]:
        """Decode observed features with the trained decoder.

        Args:
            observed: level -> ``(B, features[level], ...)``; must hold every level the decoder was built for.
            crop_size: crop size ``(D, H, W)``; default: the size of the auxiliary crops.

        Returns:
            ``(reconstruction (B, 1, D, H, W), stats)``.

        Raises:
            ValueError: :meth:`fit` was not called, or a needed level is missing.
        """
        if self.crop_size is None:
            raise ValueError("LearnedInverse.reconstruct needs fit() on auxiliary crops first")
        start = time.perf_counter()
        observed = check_observed(observed)
        reconstruction = decode_levels(self.decoder, self.levels, observed, crop_size or self.crop_size, self.device)
        stats = {"attack": self.name, "levels": list(self.levels), "seconds": time.perf_counter() - start}
        return reconstruction, stats


def decode_levels(
    decoder: InverseDecoder,
    levels: Sequence[int],
    observed: Mapping[int, torch.Tensor],
    crop_size: Sequence[int] | None,
    device: torch.device,
) -> torch.Tensor:
    """Run a trained :class:`InverseDecoder` on checked observed features (every one of ``levels`` required).

    Shared by the attacks that end in an inverse decoder (:class:`LearnedInverse`, the substitute-encoder attack).

    Returns:
        the reconstruction ``(B, 1, D, H, W)`` on the CPU.
    """
    missing = sorted(set(levels) - set(observed))
    if missing:
        raise ValueError(f"the decoder was trained on levels {list(levels)}; levels {missing} are missing")
    size = resolve_crop_size(observed, crop_size)
    inputs = {level: observed[level].float().to(device) for level in levels}
    return decoder(inputs, size).cpu()
