"""Tokenizers. Importing this package registers every model type with `build_tokenizer`, and every
released layout with the official-format registry (models/official.py) that `load_tokenizer` asks."""

from tokenizers_vis.models.base import Encoded, ModelOutput, Tokenizer, build_tokenizer, register_tokenizer

__all__ = ["Encoded", "ModelOutput", "Tokenizer", "build_tokenizer", "register_tokenizer"]
from tokenizers_vis.models.titok import TiTok  # noqa: E402  (registers "titok")
from tokenizers_vis.models.vqgan import VQGAN  # noqa: E402  (registers "vqgan")

__all__ += ["TiTok", "VQGAN"]
from tokenizers_vis.models.flextok import FlexTok  # noqa: E402  (registers "flextok")

__all__ += ["FlexTok"]
from tokenizers_vis.models.tokenflow import TokenFlow  # noqa: E402  (registers "tokenflow")

__all__ += ["TokenFlow"]
from tokenizers_vis.models.layton import Layton  # noqa: E402  (registers "layton")

__all__ += ["Layton"]

# The released layouts (each registers its official format; vqgan.py registers the MaskGIT-VQGAN file).
import tokenizers_vis.models.flextok_official  # noqa: E402,F401
import tokenizers_vis.models.titok_official  # noqa: E402,F401
import tokenizers_vis.models.tokenflow_official  # noqa: E402,F401
import tokenizers_vis.models.layton_official  # noqa: E402,F401
from tokenizers_vis.models.seed import SEED  # noqa: E402  (registers "seed")

__all__ += ["SEED"]
import tokenizers_vis.models.seed_official  # noqa: E402,F401
from tokenizers_vis.models.divot import Divot  # noqa: E402  (registers "divot")

__all__ += ["Divot"]
import tokenizers_vis.models.divot_official  # noqa: E402,F401
