"""Split-U-Net: vertical split learning for multi-modal brain MRI segmentation on NVIDIA FLARE.

Each site holds one MRI modality and that modality's 3D U-Net encoder; the FLARE server holds the decoder,
the labels and the loss (Roth et al., "Split-U-Net: Preventing Data Leakage in Split Learning for
Collaborative Multi-Modal Brain Tumor Segmentation", DeCaF@MICCAI 2022).
"""

__version__ = "0.1.0"
