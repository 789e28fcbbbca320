"""Split-U-Net networks: plain torch/MONAI modules that never import FLARE.

Each class loads on first use (see :mod:`splitunet.lazy_exports`): a site builds its encoder without loading the
decoder's code, and the server the reverse.
"""

from splitunet.lazy_exports import lazy_exports

_EXPORTS = {
    "SiteEncoder": "site_encoder",
    "ServerDecoder": "server_decoder",
    "FUSIONS": "server_decoder",
    "MonolithicSplitUNet": "split_unet",
    "seeded_encoder": "initialisation",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
