"""`TokenizerModule`: the one LightningModule that trains every tokenizer.

Manual optimization. Each step builds the generator loss (reconstruction + perceptual +
adversarial + the model's own quantizer/KL loss) and, once the GAN phase has begun, the
discriminator loss on the detached reconstructions, then runs ONE backward over their sum. The
generator's adversarial term is built with the discriminator frozen (the objective does that),
so the discriminator gets gradients only from its own loss and the tokenizer only from its own.
One backward per step keeps DDP simple: every trainable parameter is reduced once per step with
no unused-parameter search. Then the generator optimizer steps, followed by the discriminator's.

Schedules (lr warmup/cosine, GAN start) follow the module's own `step` counter, a buffer saved in
checkpoints. Lightning's `global_step` counts optimizer steps, so the discriminator optimizer is
stepped directly (not through Lightning's wrapper) and `global_step` equals tokenizer steps:
`trainer.max_steps` and checkpoint intervals mean what they say.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from tokenizers_vis.models.base import Tokenizer
from tokenizers_vis.training.optim import decay_groups, lr_multiplier

FROZEN_PREFIX = "objective.frozen."  # pretrained perceptual networks: rebuilt from config, never saved


class NonFiniteLossError(RuntimeError):
    pass


class TokenizerModule(L.LightningModule):
    """Train a `Tokenizer` with an objective.

    tokenizer: the model (instantiated by Hydra from `model.tokenizer`).
    objective: `objective(tokenizer, images, step) -> (loss, logs, output)`; may own a
        `discriminator` with `discriminator_active(step)` and `discriminator_loss(...)`.
    optimizer / disc_optimizer: partial optimizers (`_partial_: true`), called with param groups.
    schedule: {name: cosine|constant, warmup_steps, total_steps (null: trainer.max_steps), min_lr_ratio}.
    ema_decay: decay of the EMA weights used for validation, sampling and export (null: no EMA).
    max_nonfinite_steps: consecutive non-finite losses tolerated (each skipped) before stopping.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        objective: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        disc_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        schedule: dict[str, Any] | None = None,
        ema_decay: float | None = 0.999,
        grad_clip: float | None = 1.0,
        disc_grad_clip: float | None = 1.0,
        max_nonfinite_steps: int = 20,
        codebook_log_every: int = 50,
        compile: bool = False,
        gradient_checkpointing: bool = False,
        val_metrics: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.save_hyperparameters(ignore=["tokenizer", "objective"], logger=False)
        self.tokenizer = tokenizer
        self.objective = objective
        self.ema = copy.deepcopy(tokenizer).requires_grad_(False).eval() if ema_decay else None
        self.schedule = {"name": "cosine", "warmup_steps": 0, "total_steps": None, "min_lr_ratio": 0.1,
                         **(dict(schedule) if schedule else {})}
        # Own step counter (every attempted step, skipped ones included) and skip bookkeeping.
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("nonfinite_steps", torch.zeros((), dtype=torch.long))
        self._consecutive_nonfinite = 0
        codebook_size = getattr(tokenizer, "codebook_size", None)
        self._code_hist = torch.zeros(codebook_size, dtype=torch.long) if codebook_size else None
        self._val_metrics = None
        if gradient_checkpointing and hasattr(tokenizer, "set_gradient_checkpointing"):
            tokenizer.set_gradient_checkpointing(True)

    # -- setup -----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        precision = str(getattr(self.trainer, "precision", "32"))
        if "16-mixed" in precision and not precision.startswith("bf16"):
            raise ValueError("precision 16-mixed is not supported (one backward for generator and discriminator "
                             "needs one loss scale); use trainer.precision=bf16-mixed or 32")
        if self.hparams.compile:
            self.tokenizer.compile()

    def configure_optimizers(self):
        weight_decay = getattr(self.hparams.optimizer, "keywords", {}).get("weight_decay", 0.0)
        tokenizer_groups = decay_groups(self.tokenizer.named_parameters(), weight_decay,
                                        self.tokenizer.no_weight_decay_names())
        optimizers = [self.hparams.optimizer(tokenizer_groups)]
        discriminator = getattr(self.objective, "discriminator", None)
        if discriminator is not None:
            if self.hparams.disc_optimizer is None:
                raise ValueError("the objective has a discriminator but model.disc_optimizer is null")
            optimizers.append(self.hparams.disc_optimizer(discriminator.parameters()))
        for opt in optimizers:
            for group in opt.param_groups:
                group.setdefault("base_lr", group["lr"])
        return optimizers

    # -- schedules ---------------------------------------------------------------------------------
    def total_steps(self) -> int:
        total = self.schedule.get("total_steps")
        if total is None:
            total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else 1
        return int(total)

    def lr_scale(self, step: int) -> float:
        s = self.schedule
        return lr_multiplier(s["name"], step, int(s["warmup_steps"]), self.total_steps(), float(s["min_lr_ratio"]))

    def _set_lr(self, optimizers, step: int) -> float:
        scale = self.lr_scale(step)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
        return scale

    # -- training ----------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int):
        images = batch["image"]
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        opt_g, opt_d = optimizers[0], (optimizers[1] if len(optimizers) > 1 else None)
        step = int(self.step)
        self._set_lr([o.optimizer for o in optimizers], step)

        loss, logs, output = self.objective(self.tokenizer, images, step)
        train_disc = opt_d is not None and self.objective.discriminator_active(step)
        if train_disc:
            d_loss, d_logs = self.objective.discriminator_loss(images, output.reconstruction.detach(), step)
            logs.update(d_logs)
            loss = loss + d_loss
        elif opt_d is not None:
            # Before the GAN phase the discriminator must still take part in the backward so that
            # DDP reduces every parameter each step (no unused-parameter search); zero gradients.
            loss = loss + 0.0 * sum(p.reshape(-1)[0] for p in self.objective.discriminator.parameters())

        opt_g.zero_grad(set_to_none=True)
        if opt_d is not None:
            opt_d.zero_grad(set_to_none=True)
        self.manual_backward(loss)

        if self._all_finite(loss):
            self._consecutive_nonfinite = 0
            if self.hparams.grad_clip:
                self.clip_gradients(opt_g, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
            opt_g.step()
            if train_disc:
                if self.hparams.disc_grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.objective.discriminator.parameters(), self.hparams.disc_grad_clip)
                opt_d.optimizer.step()  # raw step: keeps Lightning's global_step = tokenizer steps
            self._update_ema(step)
            self._count_codes(output)
        else:
            self._skip_nonfinite_step(optimizers, step)

        self.step += 1
        logs["lr"] = torch.tensor(opt_g.optimizer.param_groups[0]["lr"])
        logs["train/step"] = self.step.float()
        self.log_dict({k if "/" in k else f"train/{k}": v for k, v in logs.items()},
                      on_step=True, prog_bar=False, batch_size=images.shape[0])
        self.log("loss", logs["loss/total"], prog_bar=True, on_step=True, batch_size=images.shape[0], logger=False)
        self._log_codebook(step)

    def _all_finite(self, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).float()
        if self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce(finite, reduce_op="min")
        return bool(finite > 0)

    def _skip_nonfinite_step(self, optimizers, step: int) -> None:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        self.nonfinite_steps += 1
        self._consecutive_nonfinite += 1
        limit = self.hparams.max_nonfinite_steps
        if self._consecutive_nonfinite >= limit:
            raise NonFiniteLossError(
                f"{limit} consecutive non-finite losses (last at step {step}); stopping. The last good weights are in "
                f"the newest checkpoint; lower the lr, enable grad clipping, or use trainer.precision=32.")

    # -- EMA ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _update_ema(self, step: int) -> None:
        if self.ema is None:
            return
        # Warm-up of the decay so short runs are not dominated by the random initial weights.
        decay = min(self.hparams.ema_decay, (1 + step) / (10 + step))
        ema_params = list(self.ema.parameters())
        params = [p.detach() for p in self.tokenizer.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_buffer, buffer in zip(self.ema.buffers(), self.tokenizer.buffers()):
            ema_buffer.copy_(buffer)

    @property
    def eval_tokenizer(self) -> Tokenizer:
        """The weights used for validation, sampling and export: EMA when kept."""
        return self.ema if self.ema is not None else self.tokenizer

    # -- codebook statistics -------------------------------------------------------------------------
    def _count_codes(self, output) -> None:
        ids = output.encoded.ids if output.encoded is not None else None
        if self._code_hist is None or ids is None:
            return
        if self._code_hist.device != ids.device:
            self._code_hist = self._code_hist.to(ids.device)
        self._code_hist += torch.bincount(ids.reshape(-1), minlength=self._code_hist.numel())

    def _log_codebook(self, step: int) -> None:
        every = self.hparams.codebook_log_every
        if self._code_hist is None or not every or (step + 1) % every:
            return
        hist = self.trainer.strategy.reduce(self._code_hist.float(), reduce_op="sum")
        total = hist.sum().clamp_min(1)
        probs = hist / total
        entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
        self.log_dict({"codebook/usage": (hist > 0).float().mean(), "codebook/perplexity": entropy.exp()},
                      on_step=True, batch_size=1)
        self._code_hist.zero_()

    # -- validation (EMA weights) ------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        from tokenizers_vis.metrics import ReconstructionMetrics

        options = {"fid": False, "lpips": False, **(self.hparams.val_metrics or {})}
        self._val_metrics = ReconstructionMetrics(codebook_size=self.eval_tokenizer.codebook_size, **options)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images = batch["image"]
        tokenizer = self.eval_tokenizer
        encoded = tokenizer.encode(images)
        reconstruction = tokenizer.decode(encoded).float().clamp(0, 1)
        self._val_metrics.update(images.float(), reconstruction, encoded.ids)

    def on_validation_epoch_end(self) -> None:
        results = self._val_metrics.compute()
        values = {f"val/{k}": float(v) for k, v in results.items() if v is not None and k != "num_images"}
        self.log_dict(values, sync_dist=False, rank_zero_only=False, batch_size=1)
        self._val_metrics = None

    # -- checkpoints -------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokenizer_config"] = self.tokenizer.config
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(FROZEN_PREFIX)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Frozen pretrained networks are not saved: take them from this freshly built module so
        # the (strict) load sees every key.
        state = checkpoint["state_dict"]
        for key, value in self.state_dict().items():
            if key.startswith(FROZEN_PREFIX):
                state[key] = value
