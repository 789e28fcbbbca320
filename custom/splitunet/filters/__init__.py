"""Privacy filters of Split-U-Net: FLARE ``DXOFilter``s on activations (site results) and gradients (server data).

Configure them as ``task_result_filters`` (sites) / ``task_data_filters`` (server) in a job, or in a site's
``local/privacy.json`` scopes; short class paths such as ``splitunet.filters.ClippedGaussianNoise`` work in both.
"""

from splitunet.filters.base import FEATURE_KINDS, FeatureFilter, FilterRejection
from splitunet.filters.block_skip_levels import BlockSkipLevels
from splitunet.filters.capture_features import CaptureFeatures
from splitunet.filters.channel_dropout import ChannelDropout
from splitunet.filters.clipped_gaussian_noise import ClippedGaussianNoise
from splitunet.filters.feature_guard import FeatureGuard
from splitunet.filters.quantize_features import QuantizeFeatures
from splitunet.filters.top_k_sparsify import TopKSparsify
from splitunet.filters.wire_audit import WireAudit

__all__ = [
    "FEATURE_KINDS",
    "FeatureFilter",
    "FilterRejection",
    "BlockSkipLevels",
    "CaptureFeatures",
    "ChannelDropout",
    "ClippedGaussianNoise",
    "FeatureGuard",
    "QuantizeFeatures",
    "TopKSparsify",
    "WireAudit",
]
