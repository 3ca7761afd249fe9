"""fastpatchdiv: fused, O(N·D)-memory patch-diversification losses for Vision Transformers.

Losses of Gong et al. 2021, "Vision Transformers with Patch Diversification" (arXiv 2104.12753).
"""

from fastpatchdiv.contrastive import PatchContrastiveFunction, PatchContrastiveLoss, patch_contrastive_loss
from fastpatchdiv.cosine import PatchCosineFunction, PatchCosineLoss, patch_cosine_loss
from fastpatchdiv.cutmix import cutmix_patches
from fastpatchdiv.mixing import PatchMixingFunction, PatchMixingLoss, patch_mixing_loss
from fastpatchdiv.trainers import PatchDiversity, TokenSpec, attach

__version__ = "0.1.0"
__all__ = [
    "PatchContrastiveFunction",
    "PatchContrastiveLoss",
    "PatchCosineFunction",
    "PatchCosineLoss",
    "PatchMixingFunction",
    "PatchDiversity",
    "PatchMixingLoss",
    "TokenSpec",
    "attach",
    "cutmix_patches",
    "patch_contrastive_loss",
    "patch_cosine_loss",
    "patch_mixing_loss",
]
