"""NoPeek at a site: a distance-correlation penalty between the crops an encoder reads and the features it sends.

NoPeek (Vepakomma et al., "NoPeek: Information leakage reduction to share activations in distributed deep
learning", ICDMW 2020) trains the part of a split network that holds the data to minimise the distance correlation
(Székely et al., Ann. Stat. 2007) between its raw input and the activations it releases, alongside the task loss, so
that the activations keep what the task needs and less of the input an inversion would recover.

NoPeek computes the correlation over the samples of a batch. Here a batch holds two crops, and the sample distance
correlation of two points is 1 whatever they are, so the samples are spatial positions instead: at level ``l`` (stride
``s = 2**l``) a position's feature vector is paired with the ``s x s x s`` cell of the crop it sits on, which is what
an inversion recovers from it. Each step draws :attr:`NoPeekSettings.positions` positions per level, across the
crops of the batch, from the site's own generator; the penalty is ``weight`` times the sum over the penalised levels
of their distance correlations.

The penalty depends on the site's crops and encoder only, so it adds to the gradient the server returned at the
site (:meth:`~splitunet.site.trainer.SiteTrainer.backward`) and nothing about it leaves the site. What it buys, and
what it does not (it does not touch the gradients, hence the labels they carry): ``docs/privacy.md``, "NoPeek".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from numbers import Real

import torch

from splitunet.errors import SplitUNetConfigError
from splitunet.wire.protocol import NUM_LEVELS

__all__ = ["NOPEEK_WEIGHT", "NoPeekSettings", "distance_correlation", "input_cells", "NoPeekPenalty"]

# The shipped weight (job ``split_unet_nopeek``): at the job's start the penalty's gradient on the encoder is about 200
# times the server's at weight 1 (measured on the phantom), so the two are of one size near 0.005; from 0.005 to 0.1
# the sampled correlations fall from 0.7-0.9 to 0.15-0.3 within 80 iterations and the training loss does not change
# (docs/privacy.md, "NoPeek").
NOPEEK_WEIGHT = 0.1
# Below this many positions a level's distance correlation says little (and at 2 it is always 1).
MIN_POSITIONS = 16
# Squared distances are clamped here before the square root: the diagonal's zeros would otherwise have an infinite
# derivative (the clamp gives them none).
_MIN_SQUARED_DISTANCE = 1e-12


@dataclass(frozen=True)
class NoPeekSettings:
    """The site executor's ``nopeek`` argument.

    Args:
        weight: the penalty's weight against the task loss (> 0; :data:`NOPEEK_WEIGHT`).
        positions: spatial positions drawn per level and step (at least :data:`MIN_POSITIONS`; fewer when the
            level has fewer).
        levels: the levels penalised (``None``: every level the site sends).
    """

    weight: float = NOPEEK_WEIGHT
    positions: int = 256
    levels: tuple[int, ...] | None = None

    def __post_init__(self):
        weight = self.weight
        if isinstance(weight, bool) or not isinstance(weight, Real) or not math.isfinite(weight) or weight <= 0:
            raise SplitUNetConfigError(f"nopeek: weight must be a finite number > 0, got {weight!r}")
        positions = self.positions
        if isinstance(positions, bool) or not isinstance(positions, int) or positions < MIN_POSITIONS:
            raise SplitUNetConfigError(f"nopeek: positions must be an int >= {MIN_POSITIONS}, got {positions!r}")
        if self.levels is not None:
            levels = tuple(self.levels)
            if not levels or any(isinstance(v, bool) or v not in range(NUM_LEVELS) for v in levels):
                raise SplitUNetConfigError(f"nopeek: levels must be levels 0..{NUM_LEVELS - 1}, got {self.levels!r}")
            object.__setattr__(self, "levels", tuple(sorted(set(levels))))
        object.__setattr__(self, "weight", float(weight))

    @classmethod
    def from_config(cls, content) -> NoPeekSettings | None:
        """The settings from a job's ``nopeek`` entry (a mapping of the fields above); ``None`` stays ``None``.

        Raises:
            SplitUNetConfigError: not a mapping, an unknown field, or a bad value (named).
        """
        if content is None:
            return None
        if not isinstance(content, Mapping):
            raise SplitUNetConfigError(f"nopeek must be a mapping of {list(cls.__dataclass_fields__)}, got {content!r}")
        unknown = set(content) - set(cls.__dataclass_fields__)
        if unknown:
            known = list(cls.__dataclass_fields__)
            raise SplitUNetConfigError(f"nopeek: unknown settings {sorted(unknown)}; known: {known}")
        return cls(**content)

    def to_dict(self) -> dict:
        content = asdict(self)
        content["levels"] = None if self.levels is None else list(self.levels)
        return content


def _distances(samples: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of ``samples`` (n, d), by the Gram matrix: n x n memory, not n x n x d."""
    squared = samples.pow(2).sum(dim=1)
    gram = samples @ samples.T
    return (squared[:, None] + squared[None, :] - 2 * gram).clamp_min(_MIN_SQUARED_DISTANCE).sqrt()


def _double_centred(distances: torch.Tensor) -> torch.Tensor:
    return distances - distances.mean(dim=0, keepdim=True) - distances.mean(dim=1, keepdim=True) + distances.mean()


def distance_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The sample distance correlation of paired rows (Székely et al. 2007, the V-statistic), differentiable.

    Args:
        x: ``(n, p)`` samples.
        y: ``(n, q)`` samples paired with ``x``'s rows.

    Returns:
        a scalar in [0, 1]: 0 when either side's distances are all equal (a constant side), else
        ``dCov(x, y) / sqrt(dVar(x) dVar(y))``, square-rooted.
    """
    if x.shape[0] != y.shape[0] or x.dim() != 2 or y.dim() != 2:
        shapes = f"{tuple(x.shape)}, {tuple(y.shape)}"
        raise ValueError(f"distance_correlation needs (n, p) and (n, q) samples, got {shapes}")
    a = _double_centred(_distances(x.float()))
    b = _double_centred(_distances(y.float()))
    covariance = (a * b).mean()
    variances = (a * a).mean() * (b * b).mean()
    if variances <= 0:
        return covariance * 0.0
    return (covariance.clamp_min(0.0) / variances.sqrt()).clamp_min(_MIN_SQUARED_DISTANCE).sqrt()


def input_cells(batch: torch.Tensor, level: int) -> torch.Tensor:
    """The crops cut into the cells that level ``level``'s positions sit on.

    Args:
        batch: ``(B, 1, D, H, W)`` crops, each side divisible by ``2**level``.

    Returns:
        ``(B, s**3, D/s, H/s, W/s)`` with ``s = 2**level``: each position's cell as a vector.
    """
    stride = 2**level
    b, c, *sides = batch.shape
    if any(side % stride for side in sides):
        raise ValueError(f"crop sides {sides} are not divisible by level {level}'s stride {stride}")
    d, h, w = (side // stride for side in sides)
    cells = batch.reshape(b, c, d, stride, h, stride, w, stride).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return cells.reshape(b, c * stride**3, d, h, w)


class NoPeekPenalty:
    """The penalty a site adds to its encoder's loss each step.

    Args:
        settings: weight, positions per level and the levels penalised.
        seed: the seed of the site's own position draws (not the server's: it never learns the positions).
    """

    def __init__(self, settings: NoPeekSettings, seed: int):
        self.settings = settings
        self.generator = torch.Generator().manual_seed(int(seed))
        # The last step's distance correlation per level, for the site's log.
        self.last: dict[int, float] = {}

    def __call__(self, batch: torch.Tensor, features: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """``weight`` times the summed distance correlations of the penalised levels of ``features`` (the pending
        graph's outputs, by level) with ``batch``'s cells."""
        levels = self.settings.levels if self.settings.levels is not None else tuple(sorted(features))
        missing = [level for level in levels if level not in features]
        if missing:
            raise ValueError(f"nopeek: penalised levels {missing} are not among the sent levels {sorted(features)}")
        total = None
        self.last = {}
        for level in levels:
            feature = features[level]
            cells = input_cells(batch.to(feature.device, torch.float32), level)
            if cells.shape[2:] != feature.shape[2:]:
                raise ValueError(f"nopeek: level {level}'s features {tuple(feature.shape)} do not match its cells")
            # Positions across the batch: (B * D * H * W, channels) rows, the same rows of both.
            cell_rows = cells.flatten(2).transpose(1, 2).reshape(-1, cells.shape[1])
            feature_rows = feature.flatten(2).transpose(1, 2).reshape(-1, feature.shape[1])
            count = min(self.settings.positions, cell_rows.shape[0])
            chosen = torch.randperm(cell_rows.shape[0], generator=self.generator)[:count].to(feature.device)
            correlation = distance_correlation(cell_rows[chosen], feature_rows[chosen])
            self.last[level] = float(correlation.detach())
            total = correlation if total is None else total + correlation
        return self.settings.weight * total
