"""`model.init_from` with `init_from_exclude`: start from a finished run whose parts differ in size."""

import pytest
import torch

from tokenizers_vis.hub import save_pretrained
from tokenizers_vis.models import build_tokenizer
from tokenizers_vis.training.module import load_initial_weights

SOURCE = dict(model_type="tokenflow", image_size=32, semantic_decoder_width=32, semantic_decoder_depth=1,
              semantic_decoder_heads=2, semantic_out_dim=16, pixel_channels=16, pixel_channel_mult=[1, 1, 1, 1],
              pixel_num_res_blocks=1, z_channels=16, pixel_norm_groups=4, codebook_size=32, scales=[1, 2, 4],
              semantic_encoder={"kind": "openai_clip", "pretrained": None, "config": {
                  "image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2, "output_dim": 16}})
# TokenFlow's stage 2 into the "enhanced" decoder: wider, with more res-blocks.
ENHANCED = {**SOURCE, "decoder_channels": 32, "decoder_num_res_blocks": 2}


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    torch.manual_seed(0)
    model = build_tokenizer(SOURCE)
    folder = tmp_path_factory.mktemp("stage1")
    save_pretrained(model, folder)
    return model, folder


def test_excluded_prefixes_keep_their_init_and_everything_else_loads(stage1):
    source, folder = stage1
    torch.manual_seed(1)
    target = build_tokenizer(ENHANCED)
    fresh_decoder = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("decoder.")}
    load_initial_weights(target, str(folder), exclude="decoder.")  # one prefix may be a plain string
    loaded, reference = target.state_dict(), source.state_dict()
    for name, value in loaded.items():
        if name.startswith("decoder."):
            assert torch.equal(value, fresh_decoder[name]), name
        else:
            assert torch.equal(value, reference[name]), name
    # The semantic decoder is not "decoder.": it loaded.
    assert any(k.startswith("semantic_decoder.") for k in loaded)


def test_a_differing_part_without_exclude_or_a_prefix_that_matches_nothing_is_refused(stage1):
    _, folder = stage1
    with pytest.raises(ValueError, match="does not match this model's architecture"):
        load_initial_weights(build_tokenizer(ENHANCED), str(folder))
    with pytest.raises(ValueError, match=r"\['decodr\.'\] match no parameter"):
        load_initial_weights(build_tokenizer(ENHANCED), str(folder), exclude=["decodr."])
    with pytest.raises(ValueError, match="needs model.init_from"):
        load_initial_weights(build_tokenizer(ENHANCED), None, exclude=["decoder."])
