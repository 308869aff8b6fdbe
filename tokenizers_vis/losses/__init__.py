"""Training objectives: reconstruction (pixel + perceptual + GAN), perceptual nets, discriminators."""

from tokenizers_vis.losses.discriminator import PatchGANDiscriminator, TiTokDiscriminator, build_discriminator
from tokenizers_vis.losses.gan import LeCamRegularizer, adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from tokenizers_vis.losses.objective import ReconstructionObjective
from tokenizers_vis.losses.perceptual import ConvNeXtPerceptualLoss, LPIPSLoss

__all__ = [
    "ConvNeXtPerceptualLoss",
    "LPIPSLoss",
    "LeCamRegularizer",
    "PatchGANDiscriminator",
    "ReconstructionObjective",
    "TiTokDiscriminator",
    "adaptive_gan_weight",
    "build_discriminator",
    "hinge_d_loss",
    "hinge_g_loss",
]
