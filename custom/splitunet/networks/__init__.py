"""Split-U-Net networks: plain torch/MONAI modules that never import FLARE."""

from splitunet.networks.server_decoder import FUSIONS, ServerDecoder
from splitunet.networks.site_encoder import SiteEncoder
from splitunet.networks.split_unet import MonolithicSplitUNet

__all__ = ["SiteEncoder", "ServerDecoder", "MonolithicSplitUNet", "FUSIONS"]
