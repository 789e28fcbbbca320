"""Privacy filters of Split-U-Net: FLARE ``DXOFilter``s on activations (site results) and gradients (server data).

Configure them as ``task_result_filters`` (sites) / ``task_data_filters`` (server) in a job, or in a site's
``local/privacy.json`` scopes; short class paths such as ``splitunet.filters.ClippedGaussianNoise`` work in both.
Each filter loads on first use (see :mod:`splitunet.lazy_exports`), so a site imports only the filters it runs.
"""

from splitunet.lazy_exports import lazy_exports

_EXPORTS = {
    "FEATURE_KINDS": "base",
    "FeatureFilter": "base",
    "FilterRejection": "base",
    "BlockSkipLevels": "block_skip_levels",
    "CaptureFeatures": "capture_features",
    "CaptureWeights": "capture_weights",
    "ChannelDropout": "channel_dropout",
    "ClippedGaussianNoise": "clipped_gaussian_noise",
    "FeatureGuard": "feature_guard",
    "GradientDetector": "gradient_detector",
    "QuantizeFeatures": "quantize_features",
    "TopKSparsify": "top_k_sparsify",
    "WireAudit": "wire_audit",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
