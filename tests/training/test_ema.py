"""EMA holds trainable parameters only: frozen parts and buffers are shared with the trained model."""

import pytest
import torch

from tokenizers_vis.losses.objective import ReconstructionObjective
from tokenizers_vis.models.titok import TiTok
from tokenizers_vis.training.module import TokenizerModule, ema_copy

FROZEN = ["latent_tokens", "encoder", "quantize"]


def tiny_titok(**kwargs) -> TiTok:
    return TiTok(image_size=32, patch_size=8, num_latent_tokens=4, encoder_width=32, encoder_depth=1,
                 encoder_heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2, codebook_size=16,
                 token_dim=4, **kwargs)


def module_for(tokenizer, ema_decay=0.9) -> TokenizerModule:
    objective = ReconstructionObjective(lpips_weight=0.0, gan_weight=0.0, discriminator=None)
    return TokenizerModule(tokenizer, objective, optimizer=torch.optim.AdamW, ema_decay=ema_decay)


def test_the_ema_copy_shares_frozen_parameters_and_buffers_and_owns_the_trainable_ones():
    tokenizer = tiny_titok(frozen=FROZEN)
    ema = ema_copy(tokenizer)
    for (name, param), ema_param in zip(tokenizer.named_parameters(), ema.parameters()):
        if param.requires_grad:
            assert ema_param is not param and ema_param.data_ptr() != param.data_ptr(), name
            assert torch.equal(ema_param, param)
        else:
            assert ema_param is param, name
    for buffer, ema_buffer in zip(tokenizer.buffers(), ema.buffers()):
        assert ema_buffer is buffer
    assert not any(p.requires_grad for p in ema.parameters()) and not ema.training
    # The frozen parameters of the trained model stay frozen, and it still trains.
    assert tokenizer.training and {n.split(".")[0] for n, p in tokenizer.named_parameters() if not p.requires_grad} \
        == set(FROZEN)


def test_ema_memory_is_the_trainable_parameter_count():
    tokenizer = tiny_titok(frozen=FROZEN)
    module = module_for(tokenizer)
    own = {id(p) for p in tokenizer.parameters()}
    ema_own = sum(p.numel() for p in module.ema.parameters() if id(p) not in own)
    trainable = sum(p.numel() for p in tokenizer.parameters() if p.requires_grad)
    assert ema_own == trainable < sum(p.numel() for p in tokenizer.parameters())


def test_ema_update_moves_trainable_weights_and_leaves_shared_ones():
    tokenizer = tiny_titok(frozen=FROZEN)
    module = module_for(tokenizer, ema_decay=0.5)
    frozen_before = {n: p.clone() for n, p in tokenizer.named_parameters() if not p.requires_grad}
    trainable = [(n, p) for n, p in tokenizer.named_parameters() if p.requires_grad]
    start = {n: module.ema.get_parameter(n).clone() for n, _ in trainable}
    with torch.no_grad():
        for _, p in trainable:
            p.add_(1.0)
    module._update_ema(step=100)  # decay min(0.5, 101/110) = 0.5
    for name, param in trainable:
        torch.testing.assert_close(module.ema.get_parameter(name), start[name] + 0.5)
    for name, value in frozen_before.items():
        assert torch.equal(tokenizer.get_parameter(name), value)
        assert module.ema.get_parameter(name) is tokenizer.get_parameter(name)


def test_a_dtype_move_keeps_frozen_parameters_shared():
    module = module_for(tiny_titok(frozen=FROZEN))
    module.to(torch.float64)
    for (name, param), ema_param in zip(module.tokenizer.named_parameters(), module.ema.parameters()):
        assert ema_param.dtype == torch.float64
        assert (ema_param is param) == (not param.requires_grad), name


def test_checkpoints_store_shared_weights_once_and_load_them_back():
    module = module_for(tiny_titok(frozen=FROZEN))
    state = module.state_dict()
    checkpoint = {"state_dict": dict(state)}
    shared = module._drop_shared_ema(checkpoint["state_dict"])
    frozen = {n for n, p in module.tokenizer.named_parameters() if not p.requires_grad}
    assert frozen <= set(shared)
    assert not any(k.startswith("ema.") and k[4:] in frozen for k in checkpoint["state_dict"])
    # A fresh module loads the reduced state strictly once the shared entries are put back.
    fresh = module_for(tiny_titok(frozen=FROZEN))
    restored = dict(checkpoint["state_dict"])
    for name in shared:
        restored["ema." + name] = restored["tokenizer." + name]
    fresh.load_state_dict(restored, strict=True)
    for name, value in state.items():
        assert torch.equal(fresh.state_dict()[name], value), name


def test_the_module_refuses_an_objective_that_is_not_an_objective():
    with pytest.raises(TypeError, match="Objective"):
        TokenizerModule(tiny_titok(), torch.nn.MSELoss(), optimizer=torch.optim.AdamW)
