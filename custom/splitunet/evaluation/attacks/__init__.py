"""Leakage attacks on Split-U-Net, in plain torch/MONAI (no FLARE), all with one contract (:class:`Attack`)::

    reconstruction, stats = attack.reconstruct(observed, crop_size=plan["size"])

- :class:`WhiteBoxInversion`: the server inverts a site's features with the site encoder's weights.
- :class:`UnSplit`: the server inverts them knowing only the architecture (Erdogan et al., WPES 2022).
- :class:`LearnedInverse`: a decoder trained on auxiliary crops maps features to images (He et al., ACSAC 2019).
- :class:`GradientLabelInference`: a site infers the tumour mask from the gradients it receives.
- :class:`AdaptiveWhiteBoxInversion`, :func:`simulate_defense` (for ``LearnedInverse.fit``'s ``feature_transform``)
  and :func:`adaptive_label_inference`: the same attacks adapted to the defense the filter trail describes
  (:func:`defense_from_trail`).
- :class:`SubstituteEncoderAttack`: the server trains its own encoder so that its features follow the distribution
  of the received ones, and an inverse of it (FORA, Xu et al., CVPR 2024; SDAR, Zhu et al., NDSS 2025).
- :func:`track_encoder`: a server that knows a site's initial encoder replays its training from the gradients it
  sent, to keep inverting white-box as the weights move (:func:`simulate_site_training` for tests).
- :class:`FeatureSpaceHijacking`: a malicious server steers the site's encoder into a feature space it can invert
  (Pasquini et al., CCS 2021), simulated in-process by :func:`run_fsha`.

Never imported by the training path (docs/design.md, "Boundaries"); the only bridge is the server's opt-in
``CaptureFeatures`` filter, whose files :func:`observed_from_capture` reads.
"""

from splitunet.evaluation.attacks.adaptive_inversion import AdaptiveWhiteBoxInversion
from splitunet.evaluation.attacks.base import Attack
from splitunet.evaluation.attacks.defense_model import (
    DefenseModel,
    average_releases,
    defense_from_trail,
    simulate_defense,
)
from splitunet.evaluation.attacks.encoder_access import EncoderPrefix, build_encoder
from splitunet.evaluation.attacks.encoder_tracking import (
    SiteRun,
    decoder_gradient_fn,
    encoder_distance,
    replay_step,
    simulate_site_training,
    site_optimizer,
    track_encoder,
)
from splitunet.evaluation.attacks.feature_space_hijacking import FeatureSpaceHijacking, HijackCritic, run_fsha
from splitunet.evaluation.attacks.label_inference import (
    LABEL_METHODS,
    GradientLabelInference,
    adaptive_label_inference,
    otsu_threshold,
)
from splitunet.evaluation.attacks.learned_inverse import InverseDecoder, LearnedInverse
from splitunet.evaluation.attacks.objectives import feature_matching_loss, total_variation_3d
from splitunet.evaluation.attacks.observed import (
    Observed,
    check_observed,
    level_sizes,
    observed_from_capture,
    resolve_crop_size,
)
from splitunet.evaluation.attacks.substitute_encoder import SubstituteEncoderAttack, mk_mmd
from splitunet.evaluation.attacks.unsplit import AUTHORS_BUDGET, UnSplit, orient_to_reference
from splitunet.evaluation.attacks.white_box_inversion import WhiteBoxInversion

__all__ = [
    "Attack",
    "EncoderPrefix",
    "build_encoder",
    "FeatureSpaceHijacking",
    "HijackCritic",
    "run_fsha",
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
    "AdaptiveWhiteBoxInversion",
    "DefenseModel",
    "average_releases",
    "defense_from_trail",
    "simulate_defense",
    "adaptive_label_inference",
    "SubstituteEncoderAttack",
    "mk_mmd",
    "AUTHORS_BUDGET",
    "SiteRun",
    "decoder_gradient_fn",
    "encoder_distance",
    "replay_step",
    "simulate_site_training",
    "site_optimizer",
    "track_encoder",
]
