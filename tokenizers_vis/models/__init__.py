"""Tokenizers. Importing this package registers every model type with `build_tokenizer`."""

from tokenizers_vis.models.base import Encoded, ModelOutput, Tokenizer, build_tokenizer, register_tokenizer

__all__ = ["Encoded", "ModelOutput", "Tokenizer", "build_tokenizer", "register_tokenizer"]
from tokenizers_vis.models.titok import TiTok  # noqa: E402  (registers "titok")

__all__ += ["TiTok"]
