"""SEED (SEED-2 / SEED-LLaMA tokenizer): 32 causal discrete tokens with high-level semantics.

    image in [0, 1] -> (resize to image_size, CLIP mean/std) -> frozen EVA ViT-g (penultimate
    layer: the BLIP-2 39-block tower, no final norm) -> `ln_vision` -> causal Q-Former (BERT-style
    post-norm layers, cross-attention to the image every 2 layers, 32 learned queries, query i sees
    queries 0..i) -> `encode_task_layer` (Linear, tanh, Linear to code_dim) -> VQ (codebook_size x
    code_dim, legacy loss, no l2) -> ids (B, 32).

    ids -> codebook rows -> `decode_task_layer` (Linear, tanh, Linear back to the Q-Former width)
      head (a): + `pos_embed` -> `blocks` (pre-LN ViT blocks): rebuilds the Q-Former outputs
                (a training target only, loss 1 - cos);
      head (b): + `pos_embed_image` -> `blocks_image` -> the unCLIP image embedding, either
                "mlp" (the released layout: per-token `image_down` 768 -> 256 -> 128 -> 32, ReLU,
                no bias, flattened query-major to 32 x 32 -> `distill_image_proj`) or
                "reverse_qformer" (one query cross-attending the 32 tokens -> `distill_image_proj`).
    The embedding conditions a frozen Stable Diffusion 2.1 unCLIP (`decode`), which is never part
    of the state dict: it is rebuilt from `unclip` (a folder / Hub id, or a tiny config in tests).

Stage 1 trains the Q-Former with image-text contrastive learning: the text branch (word + position
embeddings, text FFNs of the same Q-Former), `vision_proj` / `text_proj` and the temperature `temp`
(`text_branch=True`). Stage 2 freezes ViT and Q-Former and trains the rest (`stage=2`).

Parameter names equal the official ones except inside the Q-Formers (see `seed_official.py` for
the one mapping, and the released `AILab-CVC/seed-tokenizer-2` files).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_vis.models.base import Encoded, ModelOutput, Tokenizer, register_tokenizer
from tokenizers_vis.nn.bottleneck import QFormer
from tokenizers_vis.nn.quantizers import VectorQuantizer, float32, squared_distances
from tokenizers_vis.nn.transformer import TransformerBlock
from tokenizers_vis.nn.vision_towers import CLIP_MEAN, CLIP_STD
from tokenizers_vis.nn.weights import MissingWeightsError, read_state_file

# EVA ViT-g/14 as BLIP-2 builds it (create_eva_vit_g): the 40-block EVA-CLIP tower minus its last
# block, so its output is the penultimate layer; mlp hidden int(1408 * 4.3637) = 6144.
EVA_VIT_G = {"patch_size": 14, "width": 1408, "depth": 39, "heads": 16, "mlp_ratio": 4.3637}
# bert-base-uncased, the Q-Former's size; +1 word for the [DEC] token BLIP-2 adds.
BERT_BASE = {"width": 768, "depth": 12, "heads": 12, "mlp_dim": 3072, "vocab_size": 30523, "max_positions": 512}
HEAD_BLOCK_HEADS = 12  # the official `blocks` / `blocks_image` hard-code 12 heads
IMAGE_DOWN_WIDTHS = (256, 128, 32)  # the released head (b) per-token MLP (hard-coded)
TEMP_RANGE = (0.001, 0.5)  # the official clamp of the ITC temperature
STAGES = {
    # Stage 1: the Q-Former (query and text paths), ln_vision and the ITC projections train.
    1: ("ln_vision", "qformer", "text_embeddings", "vision_proj", "text_proj", "temp"),
    # Stage 2: ViT and Q-Former frozen; the bottleneck, the codebook and both heads train.
    2: ("encode_task_layer", "quantize", "decode_task_layer", "pos_embed", "blocks", "pos_embed_image",
        "blocks_image", "image_down", "distill_image_proj", "reverse_qformer"),
}
HEAD_B_LAYOUTS = ("mlp", "reverse_qformer")


def build_eva_vit(image_size: int, patch_size: int, width: int, depth: int, heads: int, mlp_ratio: float) -> nn.Module:
    """BLIP-2's EVA ViT as timm's `Eva`, whose layout is the official one name for name (`cls_token`,
    `pos_embed`, `patch_embed.proj`, `blocks.i.{norm1, attn.{qkv, q_bias, v_bias, proj}, norm2,
    mlp.{fc1, fc2}}`): q/v biases with no k bias, exact GELU, LayerNorm eps 1e-6, no final norm,
    no pooling and no head."""
    from timm.models.eva import Eva

    return Eva(img_size=image_size, patch_size=patch_size, embed_dim=width, depth=depth, num_heads=heads,
               mlp_ratio=mlp_ratio, qkv_bias=True, num_classes=0, global_pool="", use_fc_norm=False,
               use_post_transformer_norm=False, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))


def load_eva_weights(model: nn.Module, source: str | Path, config_key: str = "model.tokenizer.vit.pretrained") -> None:
    """Load BLIP-2's `eva_vit_g.pth` (bare names; a file saved from our `visual_encoder.*` works too).

    The file holds the 40-block EVA-CLIP tower; entries this (39-block, headless) tower lacks are
    dropped as BLIP-2's non-strict load does, but every entry of ours must be there."""
    path = Path(source)
    if not path.is_file() and "/" in str(source) and not path.exists():
        path = _hub_file(str(source), config_key)
    try:
        state = read_state_file(path, what="EVA ViT-g state dict")
    except (OSError, ValueError) as err:
        raise MissingWeightsError(f"could not read {config_key}={str(source)!r} ({err}). Point it at BLIP-2's "
                                  f"eva_vit_g.pth (a local file, or 'REPO_ID/FILE' on the Hub), or set it to "
                                  f"null for random weights.") from err
    state = {k[len("visual_encoder."):] if k.startswith("visual_encoder.") else k: v for k, v in state.items()}
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} entries of the EVA ViT, e.g. {missing[:5]}")
    model.load_state_dict({k: state[k] for k in ours}, strict=True)


def _hub_file(spec: str, config_key: str) -> Path:
    """'owner/repo/path/in/repo' -> the local file (download, or the Hub cache offline)."""
    from huggingface_hub import hf_hub_download

    owner, repo, filename = spec.split("/", 2) if spec.count("/") >= 2 else (None, None, spec)
    if owner is None:
        raise MissingWeightsError(f"{config_key}={spec!r} is neither a local file nor 'OWNER/REPO/FILE' on the Hub")
    try:
        return Path(hf_hub_download(f"{owner}/{repo}", filename))
    except Exception as err:
        raise MissingWeightsError(f"could not fetch {config_key}={spec!r} from the Hub ({err}); download it where "
                                  f"there is network and set {config_key} to the local file.") from err


class TextEmbeddings(nn.Module):
    """BERT's text embeddings without token types: word + absolute position (the Q-Former's input
    LayerNorm then normalises them together with the queries)."""

    def __init__(self, vocab_size: int, width: int, max_positions: int):
        super().__init__()
        self.word = nn.Embedding(vocab_size, width)
        self.position = nn.Embedding(max_positions, width)
        nn.init.normal_(self.word.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > self.position.num_embeddings:
            raise ValueError(f"text of {input_ids.shape[1]} tokens exceeds the "
                             f"{self.position.num_embeddings} positions")
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.word(input_ids) + self.position(positions)[None]


BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@functools.lru_cache(maxsize=4)
def load_bert_tokenizer(source: str | tuple[str, ...]):
    """transformers' BERT WordPiece tokenizer from a vocab file, a folder or a Hub id, or a tuple of
    vocabulary entries (tiny demo / smoke vocabularies, written to a temporary vocab file; BERT's
    special tokens come first), with the [DEC] token BLIP-2 adds as bos (bert-base-uncased:
    30522 + 1 = 30523 ids)."""
    import tempfile

    from transformers import BertTokenizer

    if isinstance(source, tuple):
        # A complete vocabulary (a recorded vocab file) keeps its order; a word list gets the specials first.
        entries = list(source) if set(BERT_SPECIAL_TOKENS) <= set(source) else \
            list(BERT_SPECIAL_TOKENS) + [t for t in source if t not in BERT_SPECIAL_TOKENS]
        with tempfile.NamedTemporaryFile("w", suffix="-vocab.txt", delete=False) as f:
            f.write("\n".join(entries) + "\n")
        source = f.name
    path = Path(source)
    try:
        # Positional: transformers 4 names it `vocab_file`, 5 `vocab` (and ignores a `vocab_file` keyword).
        tokenizer = BertTokenizer(str(path)) if path.is_file() else BertTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise MissingWeightsError(f"could not load the text tokenizer model.tokenizer.text_tokenizer={source!r} "
                                  f"({err}). "
                                  "Set it to a local vocab.txt or folder (download 'bert-base-uncased' where there "
                                  "is network).") from err
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


@register_tokenizer
class SEED(Tokenizer):
    """SEED tokenizer: `encode(x).ids` (B, num_queries); `image_embedding(ids)` (B, image_embed_dim),
    the embedding SEED-LLaMA decodes; `decode(ids, steps, guidance, generator)` images through unCLIP;
    `text_features(texts)` / `image_text_features(query_output)` for stage-1 retrieval.

    image_size: the ViT's input side (224); other inputs are resized (bicubic, antialiased) first.
    vit: {patch_size, width, depth, heads, mlp_ratio, pretrained}: the frozen EVA ViT (EVA_VIT_G by
        default); `pretrained` a local eva_vit_g.pth, 'OWNER/REPO/FILE' on the Hub, or null (random).
    qformer_*: the BERT sizes of the causal Q-Former; cross_attention_every (2), num_queries (32),
        causal_queries (SEED: True), qformer_dropout (BERT's 0.1, active while it trains).
    text_branch: build the stage-1 parts (text embeddings and FFNs, vision_proj / text_proj, temp);
        the released tokenizer has none. vocab_size / max_text_positions: the BERT text side
        (max_text_positions also sizes the official `position_ids` buffer); text_tokenizer: BERT
        tokenizer vocab file, folder or Hub id, or a list of vocabulary words (tiny demos);
        max_text_len: tokens per caption (32); itc_dim (256);
        temp: initial temperature (0.07).
    codebook_size / code_dim / commitment_weight: VQ 8192 x 32, legacy loss
        mse(sg(z_q), z) + commitment_weight * mse(z_q, sg(z)) (the taming bug the release trained with).
    decode_depth (4) / decode_heads (12, hard-coded in the release): blocks of each head.
    image_head: "mlp" (released) or "reverse_qformer"
        (reverse_qformer_depth layers, 1 query). image_embed_dim: the unCLIP image embedding (1024).
    stage: 1 or 2: which parts train (`STAGES`); the ViT never does.
    unclip: {pretrained, config, ...} of the frozen unCLIP decoder (see `UnCLIPDecoder`); None: no decode.
    clip_target: `nn.clip_embedder.FrozenCLIPImageEmbedder` arguments of the CLIP image encoder whose
        embedding head (b) predicts; evaluation reports the cosine to it (`extra_metrics`). Like the
        unCLIP decoder it is recorded by source and built on first use, never saved with the model.
    """

    model_type = "seed"

    def __init__(
        self,
        image_size: int = 224,
        vit: Mapping[str, Any] | None = None,
        qformer_width: int = 768,
        qformer_depth: int = 12,
        qformer_heads: int = 12,
        qformer_mlp_dim: int = 3072,
        qformer_norm_eps: float = 1e-12,
        qformer_dropout: float = 0.1,
        cross_attention_every: int = 2,
        num_queries: int = 32,
        causal_queries: bool = True,
        text_branch: bool = False,
        vocab_size: int = 30523,
        max_text_positions: int = 512,
        text_tokenizer: str | Sequence[str] | None = "bert-base-uncased",
        max_text_len: int = 32,
        itc_dim: int = 256,
        temp: float = 0.07,
        codebook_size: int = 8192,
        code_dim: int = 32,
        commitment_weight: float = 0.25,
        decode_depth: int = 4,
        decode_heads: int = HEAD_BLOCK_HEADS,
        image_head: str = "mlp",
        reverse_qformer_depth: int = 4,
        image_embed_dim: int = 1024,
        stage: int = 2,
        unclip: Mapping[str, Any] | None = None,
        clip_target: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {sorted(STAGES)}, got {stage!r}")
        if image_head not in HEAD_B_LAYOUTS:
            raise ValueError(f"image_head must be one of {HEAD_B_LAYOUTS}, got {image_head!r}")
        if stage == 1 and not text_branch:
            raise ValueError("stage 1 trains image-text contrastive learning and needs text_branch=True")
        vit = {**EVA_VIT_G, "pretrained": None, **dict(vit or {})}
        self.image_size = image_size
        self.num_tokens = num_queries
        self.codebook_size = codebook_size
        self.stage = stage
        self.image_head = image_head
        self.text_branch = text_branch
        self.text_tokenizer_source = text_tokenizer
        self.max_text_len = max_text_len
        self.max_text_positions = max_text_positions
        self.unclip_spec = dict(unclip) if unclip else None
        self._unclip = None  # built on first decode; never a submodule (not saved, not trained)
        self.clip_target_spec = dict(clip_target) if clip_target else None
        object.__setattr__(self, "_clip_target", None)  # likewise, kept out of the module tree

        # -- encoder: frozen ViT, ln_vision, causal Q-Former -------------------------------------
        pretrained = vit.pop("pretrained")
        self.visual_encoder = build_eva_vit(image_size, **vit)
        if pretrained:
            load_eva_weights(self.visual_encoder, pretrained)
        vit_width = vit["width"]
        self.ln_vision = nn.LayerNorm(vit_width, eps=1e-5)
        self.qformer = QFormer(
            qformer_width, qformer_depth, qformer_heads, num_queries, context_dim=vit_width,
            cross_attention_every=cross_attention_every, causal_queries=causal_queries, norm_eps=qformer_norm_eps,
            separate_text_mlp=text_branch, mlp_hidden_dim=qformer_mlp_dim, dropout=qformer_dropout,
            attn_dropout=qformer_dropout)
        if text_branch:
            self.text_embeddings = TextEmbeddings(vocab_size, qformer_width, max_text_positions)
            self.vision_proj = nn.Linear(qformer_width, itc_dim)
            self.text_proj = nn.Linear(qformer_width, itc_dim)
            self.temp = nn.Parameter(torch.tensor(float(temp)))

        # -- bottleneck ----------------------------------------------------------------------------
        self.encode_task_layer = nn.Sequential(nn.Linear(qformer_width, qformer_width), nn.Tanh(),
                                               nn.Linear(qformer_width, code_dim))
        # taming's legacy VectorQuantizer2: the encoder-side term has weight 1, the codebook term beta.
        self.quantize = VectorQuantizer(codebook_size, code_dim, use_l2_norm=False, commitment_weight=1.0,
                                        codebook_weight=commitment_weight)
        self.decode_task_layer = nn.Sequential(nn.Linear(code_dim, code_dim), nn.Tanh(),
                                               nn.Linear(code_dim, qformer_width))

        # -- heads -----------------------------------------------------------------------------------
        def blocks() -> nn.ModuleList:
            return nn.ModuleList(TransformerBlock(qformer_width, decode_heads, mlp_ratio=4.0, norm_eps=1e-6)
                                 for _ in range(decode_depth))

        self.pos_embed = nn.Parameter(torch.randn(1, num_queries, qformer_width) * 0.02)
        self.blocks = blocks()
        self.pos_embed_image = nn.Parameter(torch.randn(1, num_queries, qformer_width) * 0.02)
        self.blocks_image = blocks()
        if image_head == "mlp":
            w1, w2, w3 = IMAGE_DOWN_WIDTHS
            self.image_down = nn.Sequential(nn.Linear(qformer_width, w1, bias=False), nn.ReLU(),
                                            nn.Linear(w1, w2, bias=False), nn.ReLU(), nn.Linear(w2, w3, bias=False))
            self.distill_image_proj = nn.Linear(num_queries * w3, image_embed_dim)
        else:
            self.reverse_qformer = QFormer(
                qformer_width, reverse_qformer_depth, qformer_heads, 1, context_dim=qformer_width,
                cross_attention_every=cross_attention_every, causal_queries=False, norm_eps=qformer_norm_eps,
                separate_text_mlp=False, mlp_hidden_dim=qformer_mlp_dim, dropout=qformer_dropout,
                attn_dropout=qformer_dropout)
            self.distill_image_proj = nn.Linear(qformer_width, image_embed_dim)

        parts = set(self.freezable_parts())
        self.freeze_parts(trainable=[p for p in STAGES[stage] if p in parts])

    # -- inputs -------------------------------------------------------------------------------------
    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> what the ViT sees: the official transform's resize to image_size (bicubic;
        antialiased, as PIL) and CLIP mean/std. Inputs at image_size are only normalised."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"expected images of shape (B, 3, H, W) in [0, 1], got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"expected float images in [0, 1], got dtype {images.dtype}")
        x = images
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                              antialias=True)
        mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    # -- encoder ------------------------------------------------------------------------------------
    def vit_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 1 + patches, vit width): the output of the last ViT block (CLS first, no final norm)."""
        return self.visual_encoder.forward_features(pixel_values)

    def query_output(self, pixel_values: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """(B, num_queries, width): the causal Q-Former output for normalised pixel values.
        queries: (B, N, width) query embeddings to use instead of the learned ones (probes)."""
        features = self.ln_vision(self.vit_features(pixel_values))
        return self.qformer(features, queries=queries)

    def quantize_queries(self, query_output: torch.Tensor):
        """(codebook input z, quantized (straight-through), ids, aux) of a Q-Former output."""
        z = self.encode_task_layer(query_output)
        quantized, ids, aux = self.quantize(z)
        return z, quantized, ids, aux

    def codebook_distances(self, z: torch.Tensor) -> torch.Tensor:
        """(..., codebook_size) squared distances as the official VQ computes them."""
        with float32():
            d = squared_distances(z.float().reshape(-1, z.shape[-1]), self.quantize.codebook())
        return d.reshape(*z.shape[:-1], -1)

    def encode(self, images: torch.Tensor) -> Encoded:
        query_output = self.query_output(self.pixel_values(images))
        z, quantized, ids, aux = self.quantize_queries(query_output)
        return Encoded(ids=ids, latents=quantized, extras={"query_output": query_output, "aux": aux,
                                                           "codebook_input": z, "input_size": images.shape[-1]})

    # -- heads --------------------------------------------------------------------------------------
    def _quantized(self, encoded: Encoded | torch.Tensor) -> torch.Tensor:
        if isinstance(encoded, Encoded):
            if encoded.latents is not None:
                return encoded.latents
            encoded = encoded.ids
        if encoded.is_floating_point():
            return encoded
        self.check_ids(encoded, self.num_tokens)
        return self.quantize.embed(encoded)

    def quantized_up(self, encoded: Encoded | torch.Tensor) -> torch.Tensor:
        """decode_task_layer of the quantized tokens (from an Encoded, ids or quantized latents)."""
        quantized = self._quantized(encoded)
        return self.decode_task_layer(quantized.to(self.decode_task_layer[0].weight.dtype))

    def reconstruct_queries(self, up: torch.Tensor) -> torch.Tensor:
        """Head (a): `blocks(up + pos_embed)`, the rebuilt Q-Former output."""
        x = up + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x

    def image_blocks(self, up: torch.Tensor) -> torch.Tensor:
        """Head (b)'s trunk: `blocks_image(up + pos_embed_image)`."""
        x = up + self.pos_embed_image
        for block in self.blocks_image:
            x = block(x)
        return x

    def image_head_output(self, trunk: torch.Tensor) -> torch.Tensor:
        """Head (b) after its trunk: the per-token `image_down` output (B, N, 32), or the reverse
        Q-Former's single query (B, 1, width)."""
        if self.image_head == "mlp":
            return self.image_down(trunk)
        return self.reverse_qformer(trunk)

    def embedding_from_trunk(self, trunk: torch.Tensor) -> torch.Tensor:
        return self.distill_image_proj(self.image_head_output(trunk).flatten(1))

    def image_embedding(self, encoded: Encoded | torch.Tensor) -> torch.Tensor:
        """(B, image_embed_dim): the unCLIP image embedding predicted from ids (the decode path
        SEED-LLaMA uses), an Encoded or quantized latents."""
        return self.embedding_from_trunk(self.image_blocks(self.quantized_up(encoded)))

    # -- stage 1: image-text contrastive -------------------------------------------------------------
    def _require_text(self) -> None:
        if not self.text_branch:
            raise ValueError("this SEED has no text branch (text_branch=False, as the released tokenizer); "
                             "build it with text_branch=True and stage-1 weights")

    def tokenize(self, texts: Sequence[str], device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """BERT tokens of `texts` padded to max_text_len, as the official stage 1 ('max_length')."""
        self._require_text()
        if not self.text_tokenizer_source:
            raise ValueError("model.tokenizer.text_tokenizer is not set (a BERT vocab file, folder or Hub id)")
        source = self.text_tokenizer_source
        source = str(source) if isinstance(source, (str, Path)) else tuple(source)
        tokens = load_bert_tokenizer(source)(
            list(texts), padding="max_length", truncation=True, max_length=self.max_text_len, return_tensors="pt")
        device = device or self.temp.device
        return {"input_ids": tokens["input_ids"].to(device), "attention_mask": tokens["attention_mask"].to(device)}

    def text_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, width): the Q-Former's unimodal text encoding (bidirectional, padding masked)."""
        self._require_text()
        return self.qformer(text=self.text_embeddings(input_ids), text_mask=attention_mask)

    def text_features(self, texts: Sequence[str] | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, itc_dim) l2-normalised text [CLS] projections, from strings or tokenized input."""
        tokens = texts if isinstance(texts, Mapping) else self.tokenize(texts)
        hidden = self.text_hidden_states(tokens["input_ids"], tokens.get("attention_mask"))
        return F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def image_text_features(self, query_output: torch.Tensor) -> torch.Tensor:
        """(B, itc_dim): the LAST query's l2-normalised projection (the one that has seen all queries)."""
        self._require_text()
        return F.normalize(self.vision_proj(query_output[:, -1]), dim=-1)

    def temperature(self) -> torch.Tensor:
        """The ITC temperature, clamped in place to [0.001, 0.5] as the official forward does."""
        self._require_text()
        with torch.no_grad():
            self.temp.clamp_(*TEMP_RANGE)
        return self.temp

    # -- Tokenizer API --------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> ModelOutput:
        """What a training step of this stage needs, in `encoded.extras`: "query_output" always;
        stage 1 adds "itc_image" (last-query features); stage 2 adds "recon_qformer" (head a) and
        "image_embedding" (head b), with the VQ loss as `aux_loss`. SEED trains no pixel path (its
        decoder is a frozen 20-step diffusion model, far too slow per training step), so
        `reconstruction` is None (as TiTok's `pixels=False`): a pixel loss on it fails loudly instead
        of training on a fake image. `decode` / `reconstruct` give real images."""
        pixel_values = self.pixel_values(images)
        if self.stage == 1:
            query_output = self.query_output(pixel_values)
            encoded = Encoded(ids=None, latents=None, extras={"query_output": query_output,
                                                              "itc_image": self.image_text_features(query_output)})
            return ModelOutput(reconstruction=None, aux_loss=query_output.new_zeros(()), encoded=encoded)
        with torch.no_grad():  # frozen in stage 2
            query_output = self.query_output(pixel_values)
        z, quantized, ids, aux = self.quantize_queries(query_output)
        up = self.quantized_up(quantized)
        extras = {"query_output": query_output, "codebook_input": z, "aux": aux,
                  "recon_qformer": self.reconstruct_queries(up),
                  "image_embedding": self.embedding_from_trunk(self.image_blocks(up))}
        logs = {f"quantizer/{k}": v.detach() for k, v in aux.items() if k != "loss"}
        return ModelOutput(reconstruction=None, aux_loss=aux["loss"], logs=logs,
                           encoded=Encoded(ids=ids, latents=quantized, extras=extras))

    @torch.no_grad()
    def decode(self, encoded: Encoded | torch.Tensor, steps: int = 20, guidance: float = 10.0,
               generator: torch.Generator | None = None, size: int | None = None, **sampling) -> torch.Tensor:
        """Images in [0, 1] from ids (or an Encoded): the predicted image embedding conditions the
        frozen unCLIP decoder (noise level 0, `steps` steps, CFG `guidance`, seeded by `generator`).
        size: output side (None: the encoded images' side for an Encoded, else unCLIP's own)."""
        if size is None and isinstance(encoded, Encoded):
            size = encoded.extras.get("input_size")
        embedding = self.image_embedding(encoded)
        images = self.unclip_decoder().generate(embedding, steps=steps, guidance=guidance, generator=generator,
                                                **sampling)
        if size and images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        return images.clamp(0, 1)

    def unclip_decoder(self):
        if self._unclip is None:
            if not self.unclip_spec:
                raise ValueError("this SEED has no unCLIP decoder configured (model.tokenizer.unclip); "
                                 "image_embedding(ids) gives the embedding SEED-LLaMA decodes")
            from tokenizers_vis.models.seed_unclip import UnCLIPDecoder

            self._unclip = UnCLIPDecoder(**self.unclip_spec)
        device = self.pos_embed.device
        if self._unclip.device != device:
            self._unclip.to(device)
        return self._unclip

    def clip_target(self) -> nn.Module:
        """The frozen CLIP image encoder of `clip_target` (built on first use, on this model's device)."""
        if self._clip_target is None:
            if not self.clip_target_spec:
                raise ValueError("this SEED has no CLIP target configured (model.tokenizer.clip_target)")
            from tokenizers_vis.nn.clip_embedder import FrozenCLIPImageEmbedder

            object.__setattr__(self, "_clip_target", FrozenCLIPImageEmbedder(**self.clip_target_spec))
        return self._clip_target.to(self.pos_embed.device)

    @torch.no_grad()
    def extra_metrics(self, images: torch.Tensor, encoded: Encoded) -> dict[str, torch.Tensor]:
        """Per-image numbers evaluation reports besides the pixel metrics: the cosine between the
        image embedding predicted from the ids and the CLIP target's embedding of the image (the
        meaningful number when the unCLIP decoder is random or its samples vary). {} without a target."""
        if not self.clip_target_spec:
            return {}
        predicted = self.image_embedding(encoded.ids).float()
        target = self.clip_target()(images)
        return {"embedding_cosine": F.cosine_similarity(predicted, target, dim=-1)}

    def no_weight_decay_names(self) -> set[str]:
        names = {"pos_embed", "pos_embed_image", "quantize.embedding.weight", "qformer.queries.weight"}
        if self.text_branch:
            names |= {"temp", "text_embeddings.word.weight", "text_embeddings.position.weight"}
        if self.image_head == "reverse_qformer":
            names.add("reverse_qformer.queries.weight")
        return names

    @property
    def config(self) -> dict[str, Any]:
        """The architecture config; the ViT is recorded without its pretrained source, since its
        weights travel in the state dict (a saved SEED rebuilds offline), and a local vocab file by
        its entries."""
        config = super().config
        config["vit"] = {**dict(config.get("vit") or {}), "pretrained": None}
        source = config.get("text_tokenizer")
        if isinstance(source, str) and Path(source).is_file():
            # A local vocab file is recorded by content, so a saved SEED tokenizes the same anywhere.
            config["text_tokenizer"] = Path(source).read_text(encoding="utf-8").splitlines()
        return config
