"""Training: the one LightningModule, its callbacks and optimizer helpers."""

from tokenizers_vis.training.callbacks import ReconstructionLogger, Throughput
from tokenizers_vis.training.module import NonFiniteLossError, TokenizerModule

__all__ = ["NonFiniteLossError", "ReconstructionLogger", "Throughput", "TokenizerModule"]
