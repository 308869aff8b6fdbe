"""Adversarial loss pieces: hinge losses, the LeCam regulariser, the VQGAN adaptive generator weight.

Everything reduces in float32 so the losses stay exact when the networks run under bf16 autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_vis.nn.distributed import all_reduce_mean


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])."""
    real = F.relu(1.0 - real_logits.float()).mean()
    fake = F.relu(1.0 + fake_logits.float()).mean()
    return 0.5 * (real + fake)


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss -E[D(G(z))]."""
    return -fake_logits.float().mean()


class LeCamRegularizer(nn.Module):
    """LeCam regulariser (Tseng et al., 2021) for the discriminator.

    Keeps exponential moving averages of the mean real and fake logits as buffers (so they are
    saved and resumed exactly) and penalises logits that cross the other side's average:
    mean(relu(real - ema_fake)^2) + mean(relu(ema_real - fake)^2).
    The averages update only in training mode, before the penalty is computed; the first update
    copies the batch means so the averages do not start biased towards zero. Under DDP the batch
    means are averaged over ranks first, so every rank holds the same averages (the checkpoint
    saves one rank's buffers: rank-local averages would not resume exactly on the others).
    """

    def __init__(self, decay: float = 0.999):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"LeCam decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros((), dtype=torch.float32))
        self.register_buffer("ema_fake", torch.zeros((), dtype=torch.float32))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> None:
        # torch.where instead of a Python branch: no host sync on the update count.
        decay = torch.where(self.num_updates > 0, self.decay, 0.0).to(self.ema_real)
        # One 2-element collective per discriminator step under DDP.
        means = all_reduce_mean(torch.stack([real_logits.float().mean(), fake_logits.float().mean()]))
        self.ema_real.copy_(decay * self.ema_real + (1.0 - decay) * means[0])
        self.ema_fake.copy_(decay * self.ema_fake + (1.0 - decay) * means[1])
        self.num_updates += 1

    def forward(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.update(real_logits.detach(), fake_logits.detach())
        real_term = F.relu(real_logits.float() - self.ema_fake).pow(2).mean()
        fake_term = F.relu(self.ema_real - fake_logits.float()).pow(2).mean()
        return real_term + fake_term


def adaptive_gan_weight(
    nll_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer_weight: torch.Tensor,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> torch.Tensor:
    """VQGAN's balance: ||d nll / d w|| / (||d g / d w|| + eps) at the last layer w, clamped, detached.

    Gradients are taken with retain_graph=True so the caller can still backpropagate the total loss.
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer_weight, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)[0]
    weight = nll_grad.float().norm() / (g_grad.float().norm() + eps)
    return weight.clamp(0.0, max_weight).detach()
