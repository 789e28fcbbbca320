"""Leakage attacks on Split-U-Net, in plain torch/MONAI (no FLARE), all with one contract (:class:`Attack`)::

    reconstruction, stats = attack.reconstruct(observed, crop_size=plan["size"])

- :class:`WhiteBoxInversion`: the server inverts a site's features with the site encoder's weights.
- :class:`UnSplit`: the server inverts them knowing only the architecture (Erdogan et al., WPES 2022).
- :class:`LearnedInverse`: a decoder trained on auxiliary crops maps features to images (He et al., ACSAC 2019).
- :class:`GradientLabelInference`: a site infers the tumour mask from the gradients it receives.

Never imported by the training path (docs/design.md, "Boundaries"); the only bridge is the server's opt-in
``CaptureFeatures`` filter, whose files :func:`observed_from_capture` reads.
"""

from splitunet.evaluation.attacks.base import Attack
from splitunet.evaluation.attacks.encoder_access import EncoderPrefix, build_encoder
from splitunet.evaluation.attacks.label_inference import LABEL_METHODS, GradientLabelInference, otsu_threshold
from splitunet.evaluation.attacks.learned_inverse import InverseDecoder, LearnedInverse
from splitunet.evaluation.attacks.objectives import feature_matching_loss, total_variation_3d
from splitunet.evaluation.attacks.observed import (
    Observed,
    check_observed,
    level_sizes,
    observed_from_capture,
    resolve_crop_size,
)
from splitunet.evaluation.attacks.unsplit import UnSplit, orient_to_reference
from splitunet.evaluation.attacks.white_box_inversion import WhiteBoxInversion

__all__ = [
    "Attack",
    "EncoderPrefix",
    "build_encoder",
    "LABEL_METHODS",
    "GradientLabelInference",
    "otsu_threshold",
    "InverseDecoder",
    "LearnedInverse",
    "feature_matching_loss",
    "total_variation_3d",
    "Observed",
    "check_observed",
    "level_sizes",
    "observed_from_capture",
    "resolve_crop_size",
    "UnSplit",
    "orient_to_reference",
    "WhiteBoxInversion",
]
