"""Reconstruction metrics: streaming float64 FID, PSNR/SSIM/LPIPS, codebook usage."""

from tokenizers_vis.metrics.codebook import CodebookUsage
from tokenizers_vis.metrics.fid import (
    INCEPTION_WEIGHTS_FILE,
    FeatureStats,
    InceptionFeatures,
    StreamingFID,
    frechet_distance,
)
from tokenizers_vis.metrics.fvd import I3D_WEIGHTS_FILE, I3DFeatures, StreamingFVD
from tokenizers_vis.metrics.video import VideoReconstructionMetrics, temporal_error
from tokenizers_vis.metrics.image import per_frame, psnr_per_image, quantize, ssim_per_image, to_uint8
from tokenizers_vis.metrics.perceptual import VGG16_WEIGHTS_FILE, LPIPSMetric, build_lpips_vgg
from tokenizers_vis.metrics.reconstruction import METRIC_KEYS, ReconstructionMetrics
from tokenizers_vis.nn.weights import MissingWeightsError, find_weights

__all__ = [
    "CodebookUsage",
    "FeatureStats",
    "I3DFeatures",
    "I3D_WEIGHTS_FILE",
    "StreamingFVD",
    "VideoReconstructionMetrics",
    "temporal_error",
    "INCEPTION_WEIGHTS_FILE",
    "InceptionFeatures",
    "LPIPSMetric",
    "METRIC_KEYS",
    "MissingWeightsError",
    "ReconstructionMetrics",
    "StreamingFID",
    "VGG16_WEIGHTS_FILE",
    "build_lpips_vgg",
    "find_weights",
    "frechet_distance",
    "per_frame",
    "psnr_per_image",
    "quantize",
    "ssim_per_image",
    "to_uint8",
]
