"""tokenizers_vis: train, evaluate and ship visual tokenizers."""

from tokenizers_vis.models import Encoded, ModelOutput, Tokenizer, build_tokenizer
from tokenizers_vis.models.loading import load_tokenizer, save_pretrained

__all__ = ["Encoded", "ModelOutput", "Tokenizer", "build_tokenizer", "load_tokenizer", "save_pretrained"]
__version__ = "0.1.0"
