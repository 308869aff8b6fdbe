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
`trainer.max_steps` and checkpoint intervals mean what they say (a step skipped for a non-finite
loss advances `step` but not `global_step`).

Exact resume: a checkpoint holds, besides weights, EMA, optimizers and `step`, the random state
a training step draws from and the counters that are not buffers. Each step starts from the
random state the previous one ended with, so validation, image logging or loader start-up
between steps (which differ between an uninterrupted and a resumed run) never change training.
Each step's logs are written to the loggers inside the step, and loggers are flushed before every
checkpoint, so a checkpoint is never ahead of the logs; a resumed run first drops the rows an
interrupted run wrote after its checkpoint (`resume_at_step` of `ResumableCSVLogger`).

The objective is a `losses.base.Objective`: the module calls its hooks (`initial_weights`,
`prepare`, `forward(tokenizer, batch, step)`, `discriminator_active`, `discriminator_loss`,
`unsaved_prefixes`) and probes nothing else. It receives the whole batch (images or video, and
text when present).

EMA holds the trainable parameters only: the EMA copy shares the frozen parameters (a pretrained
VAE, a frozen UNet) and the buffers with the trained tokenizer, so a frozen part of N parameters
costs no extra memory. Checkpoints hold those once, under `tokenizer.*`, and list them in
`ema_shared` (`models.loading.EMA_SHARED_KEY`); loading copies them back into `ema.*`.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn

from tokenizers_vis.losses.base import Objective
from tokenizers_vis.models.base import Tokenizer, batch_pixels
from tokenizers_vis.models.loading import EMA_PREFIX, EMA_SHARED_KEY, RAW_PREFIX
from tokenizers_vis.training.rng import rng_state, set_rng_state
from tokenizers_vis.training.optim import decay_groups, lr_multiplier

SCHEDULE_KEYS = ("name", "warmup_steps", "total_steps", "min_lr_ratio")


class NonFiniteLossError(RuntimeError):
    pass


def ema_copy(tokenizer: Tokenizer) -> Tokenizer:
    """A copy of `tokenizer` to hold EMA weights, in eval mode without gradients. Its trainable
    parameters are its own; frozen parameters and buffers are the SAME tensors as the tokenizer's
    (EMA would keep them equal anyway), so a frozen multi-billion-parameter part is held once."""
    shared = {id(t): t for t in tokenizer.parameters() if not t.requires_grad}
    shared.update({id(t): t for t in tokenizer.buffers()})
    return copy.deepcopy(tokenizer, memo=shared).requires_grad_(False).eval()


def load_initial_weights(tokenizer: Tokenizer, source: str | None = None, objective: Objective | None = None,
                         exclude: Sequence[str] | str | None = None) -> None:
    """Set the weights training starts from (before the EMA copy is taken).

    First the part the objective supplies with `initial_weights(tokenizer)` (TiTok's proxy-code
    stage: the teacher's decoder and codebook as the pixel decoder); then `source`
    (`model.init_from`: a .ckpt of ours -> its EMA weights, a saved folder or a Hub id), loaded
    strictly except for the parameter-name prefixes in `exclude` (`model.init_from_exclude`),
    which keep their fresh init on both sides, so they may differ in architecture (TokenFlow's
    stage 2 into the larger "enhanced" pixel decoder: exclude `decoder.`).
    """
    from tokenizers_vis.models.loading import load_tokenizer

    supplied = objective.initial_weights(tokenizer) if objective is not None else {}
    if supplied:
        unexpected = tokenizer.load_state_dict(supplied, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"{type(objective).__name__}.initial_weights gave keys this model lacks: {unexpected[:8]}")
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude or ())
    if exclude and not source:
        raise ValueError(f"model.init_from_exclude={list(exclude)} needs model.init_from")
    if not source:
        return
    names = tokenizer.state_dict().keys()
    unused = [prefix for prefix in exclude if not any(name.startswith(prefix) for name in names)]
    if unused:
        raise ValueError(f"model.init_from_exclude prefixes {unused} match no parameter of this model")
    state = {k: v for k, v in load_tokenizer(source).state_dict().items() if not k.startswith(exclude)}
    mismatch = f"model.init_from={source} does not match this model's architecture (parts that differ on " \
               "purpose go in model.init_from_exclude)"
    try:
        missing, unexpected = tokenizer.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"{mismatch}: {err}") from err
    missing = [k for k in missing if not k.startswith(exclude)]
    if missing or unexpected:
        raise ValueError(f"{mismatch}: missing {missing[:8]}, unexpected {unexpected[:8]}")


class TokenizerModule(L.LightningModule):
    """Train a `Tokenizer` with an objective.

    tokenizer: the model (instantiated by Hydra from `model.tokenizer`).
    objective: a `losses.base.Objective`: `objective(tokenizer, batch, step) -> (loss, logs, output)`,
        its `discriminator` (or None) with `discriminator_active(step)` and `discriminator_loss(...)`.
    optimizer / disc_optimizer: partial optimizers (`_partial_: true`), called with param groups.
    schedule: {name: cosine|constant, warmup_steps, total_steps (null: trainer.max_steps), min_lr_ratio}.
    ema_decay: decay of the EMA weights used for validation, sampling and export (null: no EMA);
        EMA covers the trainable parameters (frozen ones are shared, see `ema_copy`).
    max_nonfinite_steps: consecutive non-finite losses tolerated before stopping. A non-finite
        step is skipped (no optimizer or EMA update, buffers as before it) and counted; the
        stop raises `NonFiniteLossError` and the checkpoint callback saves `last.ckpt` first.
        The skip is done on the device (masked updates; fused optimizers skip in their kernel), so
        the step reads nothing back: the count is checked every `trainer.log_every_n_steps` steps
        and at the last step, and training stops at the first check that sees the run.
    init_from: start from these tokenizer weights (a .ckpt of ours -> its EMA weights, a saved
        folder, or a Hub id), e.g. stage 2 from a stage-1 run. Loaded strictly. Unlike
        `ckpt_path` (resume), optimizer state and step counter start fresh. The objective's
        `initial_weights(tokenizer)` supplies part of the weights first (see `load_initial_weights`).
    init_from_exclude: parameter-name prefixes init_from leaves at their fresh init (parts whose
        architecture changes between stages).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        objective: Objective,
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
        init_from: str | None = None,
        init_from_exclude: Sequence[str] | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        if not isinstance(objective, Objective):
            raise TypeError(f"model.objective must be a tokenizers_vis.losses.base.Objective, got "
                            f"{type(objective).__name__}")
        self.save_hyperparameters(ignore=["tokenizer", "objective"], logger=False)
        load_initial_weights(tokenizer, init_from, objective, init_from_exclude)
        self.tokenizer = tokenizer
        self.objective = objective
        objective.prepare(tokenizer)  # parts the objective derives from the model (TokenFlow's frozen teacher)
        self.ema = ema_copy(tokenizer) if ema_decay else None
        unknown = sorted(set(schedule or {}) - set(SCHEDULE_KEYS))
        if unknown:
            raise ValueError(f"model.schedule has unknown key(s) {unknown}; expected some of {list(SCHEDULE_KEYS)}")
        self.schedule = {"name": "cosine", "warmup_steps": 0, "total_steps": None, "min_lr_ratio": 0.1,
                         **(dict(schedule) if schedule else {})}
        # Own step counter (every attempted step, skipped ones included) and skip bookkeeping.
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("nonfinite_steps", torch.zeros((), dtype=torch.long))
        # Host mirrors of device state, so the step reads nothing back (see `_host_checks`): the
        # step counter, the skips already taken out of Lightning's global_step, and (on the
        # device, not a buffer) the length of the current run of non-finite steps.
        self._host_step: int | None = None
        self._skips_seen: int | None = None
        self._nonfinite_run = torch.zeros((), dtype=torch.long)
        codebook_size = getattr(tokenizer, "codebook_size", None)
        self._code_hist = torch.zeros(codebook_size, dtype=torch.long) if codebook_size else None
        self._val_metrics = None
        self._rng_state: dict[str, Any] | None = None  # what the next training step draws from
        if gradient_checkpointing and hasattr(tokenizer, "set_gradient_checkpointing"):
            tokenizer.set_gradient_checkpointing(True)

    # -- setup -----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        precision = str(getattr(self.trainer, "precision", "32"))
        if "16-mixed" in precision and not precision.startswith("bf16"):
            raise ValueError("precision 16-mixed is not supported (one backward for generator and discriminator "
                             "needs one loss scale); use trainer.precision=bf16-mixed or 32")
        if self.hparams.compile:
            # Without a discriminator the objective's forward (the tokenizer's training forward and
            # the losses) compiles as one graph. The GAN terms break it (they toggle the
            # discriminator's requires_grad), so with a discriminator only the tokenizer's forward is.
            if self.objective.discriminator is None:
                self.objective.compile()
            else:
                self.tokenizer.compile()

    def configure_optimizers(self):
        weight_decay = getattr(self.hparams.optimizer, "keywords", {}).get("weight_decay", 0.0)
        tokenizer_groups = decay_groups(self.tokenizer.named_parameters(), weight_decay,
                                        self.tokenizer.no_weight_decay_names())
        optimizers = [self.hparams.optimizer(tokenizer_groups)]
        discriminator = self.objective.discriminator
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
        if self._rng_state is not None:
            set_rng_state(self._rng_state, self.device)
        images = batch_pixels(batch)
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        opt_g, opt_d = optimizers[0], (optimizers[1] if len(optimizers) > 1 else None)
        if self._host_step is None:  # once per fit (reset by on_train_start)
            self._host_step, self._skips_seen = torch.stack([self.step, self.nonfinite_steps]).tolist()
        step = self._host_step
        self._set_lr([o.optimizer for o in optimizers], step)
        # Buffers the forward updates in place (codebook statistics, LeCam averages): a skipped
        # step must not leave its NaNs in them.
        buffers = self._step_buffers()
        saved_buffers = [b.clone() for b in buffers]

        loss, logs, output = self.objective(self.tokenizer, batch, step)
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

        # A non-finite step is undone on the device: the flag masks every update (no branch on it).
        # Fused optimizers take it as `found_inf` and skip their update (weights, moments, step
        # counts) in the kernel. Others keep their step counts on the host and cannot be undone on
        # the device: for them the flag is read here, the one host sync such a step keeps.
        finite = self._all_finite(loss)
        device_skip = all(self._skips_on_device(o.optimizer) for o in optimizers)
        if device_skip or bool(finite):
            if self.hparams.grad_clip:
                self.clip_gradients(opt_g, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
            with self._found_inf(opt_g.optimizer, finite, device_skip):
                opt_g.step()  # Lightning counts it; `_host_checks` takes skipped ones back out
            if train_disc:
                if self.hparams.disc_grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.objective.discriminator.parameters(), self.hparams.disc_grad_clip)
                with self._found_inf(opt_d.optimizer, finite, device_skip):
                    opt_d.optimizer.step()  # raw step: keeps Lightning's global_step = tokenizer steps
        else:
            self._skip_nonfinite_step(optimizers)
        for buffer, saved in zip(buffers, saved_buffers):
            buffer.copy_(torch.where(finite, buffer, saved))
        self._update_ema(step, finite)
        self._count_codes(output, finite)
        self.nonfinite_steps += (~finite).long()
        self._nonfinite_run = torch.where(finite, 0, self._nonfinite_run.to(finite.device) + 1)

        self.step += 1
        self._host_step = step + 1
        logs["lr"] = torch.tensor(opt_g.optimizer.param_groups[0]["lr"])
        logs["train/step"] = self.step.float()
        logs = {k if "/" in k else f"train/{k}": v for k, v in logs.items()}
        self.log_dict(logs, on_step=True, prog_bar=False, logger=False, batch_size=images.shape[0])
        self.log("loss", logs["loss/total"], prog_bar=True, on_step=True, batch_size=images.shape[0], logger=False)
        self._write_logs(step, logs)
        self._rng_state = rng_state(self.device)
        self._host_checks(step)

    @property
    def host_step(self) -> int:
        """The step counter as a Python int without a device read during training (callbacks use it)."""
        return self._host_step if self._host_step is not None else int(self.step)

    def _host_checks(self, step: int) -> None:
        """The host's view of the skips, read from the device every `trainer.log_every_n_steps` steps,
        at step-interval checkpoints and at the last step (one sync there, none between): skipped
        steps are taken back out of Lightning's global_step (so max_steps and checkpoint intervals
        count steps taken), and a run of `max_nonfinite_steps` consecutive non-finite steps stops
        training."""
        if self._trainer is None:
            return
        every = max(1, self.trainer.log_every_n_steps or 1)
        max_steps = self.trainer.max_steps or -1
        global_step = self.trainer.global_step
        # ModelCheckpoint decides from global_step after this step: correct it before.
        checkpoint = any(getattr(callback, "_every_n_train_steps", 0) and
                         global_step % callback._every_n_train_steps == 0
                         for callback in self.trainer.checkpoint_callbacks)
        if (step + 1) % every and not checkpoint and not 0 < max_steps <= global_step:
            return
        skipped, run = torch.stack([self.nonfinite_steps, self._nonfinite_run.to(self.nonfinite_steps)]).tolist()
        if skipped > self._skips_seen:
            progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
            for tracker in (progress.total, progress.current):
                tracker.ready -= skipped - self._skips_seen
                tracker.completed -= skipped - self._skips_seen
            self._skips_seen = skipped
        if run >= self.hparams.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{run} consecutive non-finite losses (steps {step + 1 - run}..{step}), each skipped; stopping. The "
                f"weights, EMA and optimizer states are those from before these steps. Lower the lr, keep grad "
                f"clipping on, or use trainer.precision=32, then resume with ckpt_path=last.")

    def _all_finite(self, loss: torch.Tensor) -> torch.Tensor:
        """Whether the loss is finite on every rank: a 0-d bool tensor on the device, never read here."""
        finite = torch.isfinite(loss.detach()).float()
        if self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce(finite, reduce_op="min")
        return finite > 0

    @property
    def _consecutive_nonfinite(self) -> int:
        """Length of the current run of non-finite steps (a host read: checkpoints and `_host_checks`)."""
        return int(self._nonfinite_run)

    @_consecutive_nonfinite.setter
    def _consecutive_nonfinite(self, value: int) -> None:
        self._nonfinite_run = torch.tensor(int(value), dtype=torch.long, device=self._nonfinite_run.device)

    @staticmethod
    def _skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
        """Fused optimizers (Adam, AdamW, SGD with fused=True) take a `found_inf` flag and skip the
        whole update in their kernel when it is set."""
        return bool(optimizer.defaults.get("fused"))

    @staticmethod
    @contextlib.contextmanager
    def _found_inf(optimizer: torch.optim.Optimizer, finite: torch.Tensor, device_skip: bool):
        """`optimizer.step()` inside skips on the device when `finite` is False (device_skip)."""
        if not device_skip:
            yield
            return
        optimizer.found_inf = (~finite).float()
        try:
            yield
        finally:
            del optimizer.found_inf

    def _unsaved_prefixes(self) -> tuple[str, ...]:
        """Module state-dict prefixes of the objective's frozen nets (rebuilt from config, never saved)."""
        return tuple("objective." + prefix for prefix in self.objective.unsaved_prefixes())

    def _step_buffers(self) -> list[torch.Tensor]:
        return [b for name, b in self.named_buffers()
                if name.startswith(("tokenizer.", "objective.")) and not name.startswith(self._unsaved_prefixes())]

    def _skip_nonfinite_step(self, optimizers) -> None:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        self._skips_seen += 1  # no optimizer step was taken: Lightning's global_step did not count it

    # -- logging -----------------------------------------------------------------------------------
    def _write_logs(self, step: int, logs: dict[str, Any]) -> None:
        """Write step `step`'s logs (every `trainer.log_every_n_steps` steps) and codebook statistics
        (every `codebook_log_every`) to the loggers now, within the step. Lightning would write
        them only after the step's callbacks, one of which may save the checkpoint of this step:
        a crash in between would then lose the step's row for good."""
        codebook = self._codebook_stats(step)  # a collective: on every rank
        if not self.loggers or not self.trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in logs.items()} if (step + 1) % self.trainer.log_every_n_steps == 0 else {}
        metrics.update(codebook)
        if metrics:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=step)

    def on_train_start(self) -> None:
        # Rows that an interrupted run logged after the checkpoint this run resumes from (or,
        # on a fresh start, rows of an earlier run in this folder) are logged again from here.
        for logger in self.loggers:
            if hasattr(logger, "resume_at_step"):
                logger.resume_at_step(int(self.step))
        self._host_step = None  # read again from the (possibly restored) buffers by the first step

    # -- EMA ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _update_ema(self, step: int, finite: torch.Tensor | None = None) -> None:
        """Move the EMA weights towards the trained ones; where `finite` (a 0-d device bool) is False
        they stay as they are (a lerp by 0, so nothing is read back)."""
        if self.ema is None:
            return
        # Warm-up of the decay so short runs are not dominated by the random initial weights.
        decay = min(self.hparams.ema_decay, (1 + step) / (10 + step))
        pairs = [(e, p.detach()) for e, p in zip(self.ema.parameters(), self.tokenizer.parameters()) if e is not p]
        if pairs:
            ema_params, params = map(list, zip(*pairs))
            if finite is None:
                torch._foreach_lerp_(ema_params, params, 1.0 - decay)
            else:
                weight = torch.where(finite, 1.0 - decay, 0.0)
                weights = {t.dtype: weight.to(t.dtype) for t in ema_params}
                torch._foreach_lerp_(ema_params, params, [weights[t.dtype] for t in ema_params])
        for ema_buffer, buffer in zip(self.ema.buffers(), self.tokenizer.buffers()):
            if ema_buffer is not buffer:  # shared unless a device move gave the copy its own
                ema_buffer.copy_(buffer)

    @property
    def eval_tokenizer(self) -> Tokenizer:
        """The weights used for validation, sampling and export: EMA when kept."""
        return self.ema if self.ema is not None else self.tokenizer

    # -- codebook statistics -------------------------------------------------------------------------
    def _count_codes(self, output, finite: torch.Tensor | None = None) -> None:
        """Add the step's ids to the histogram on the device (read only by `_codebook_stats`); nothing
        where `finite` (a 0-d device bool) is False."""
        ids = output.encoded.ids if output.encoded is not None else None
        if self._code_hist is None or ids is None:
            return
        if self._code_hist.device != ids.device:
            self._code_hist = self._code_hist.to(ids.device)
        ids = ids.reshape(-1)
        # Negative ids mark positions without a code (TokenFlow's dropped training scale): they add 0.
        # An integer scatter-add instead of bincount, which reads the largest id back to size its
        # output and needs the negative ids taken out by a boolean mask (another read); it is exact
        # and has a deterministic CUDA kernel (trainer.deterministic=true).
        counted = ids >= 0
        if finite is not None:
            counted = counted & finite
        self._code_hist.scatter_add_(0, ids.clamp(min=0), counted.long())

    def _codebook_stats(self, step: int) -> dict[str, float]:
        """Usage and perplexity of the codes counted since the last report, every `codebook_log_every` steps
        (summed over ranks: every rank must call this at the same steps)."""
        every = self.hparams.codebook_log_every
        if self._code_hist is None or not every or (step + 1) % every:
            return {}
        hist = self.trainer.strategy.reduce(self._code_hist.float(), reduce_op="sum")
        total = hist.sum().clamp_min(1)
        probs = hist / total
        entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
        self._code_hist.zero_()
        return {"codebook/usage": float((hist > 0).float().mean()), "codebook/perplexity": float(entropy.exp())}

    # -- validation (EMA weights) ------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        from tokenizers_vis.metrics import ReconstructionMetrics

        options = {"fid": False, "lpips": False, **(self.hparams.val_metrics or {})}
        self._val_metrics = ReconstructionMetrics(codebook_size=self.eval_tokenizer.codebook_size, **options)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images = batch_pixels(batch)
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
        for key in [k for k in state if k.startswith(self._unsaved_prefixes())]:
            del state[key]
        checkpoint[EMA_SHARED_KEY] = self._drop_shared_ema(state)
        # Every row logged so far reaches the disk before the checkpoint does.
        for logger in self.loggers:
            logger.save()
        rng = self._rng_state if self._rng_state is not None else rng_state(self.device)
        checkpoint["training_state"] = {
            "rng": self._gather(rng),
            "consecutive_nonfinite": self._consecutive_nonfinite,
            "code_hist": self._code_hist.cpu().clone() if self._code_hist is not None else None,
            # The lr curve's length: with total_steps null it follows trainer.max_steps (see on_load_checkpoint).
            "schedule_total_steps": self.total_steps() if self._trainer is not None else None,
        }

    def _drop_shared_ema(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Remove from `state` the EMA entries equal to the trained copy's among its frozen parameters
        and buffers (a frozen VAE would otherwise be saved twice); their names, for the load."""
        if self.ema is None:
            return []
        frozen = [name for name, p in self.tokenizer.named_parameters() if not p.requires_grad]
        frozen += [name for name, _ in self.tokenizer.named_buffers()]
        shared = []
        for name in frozen:
            ema, raw = state.get(EMA_PREFIX + name), state.get(RAW_PREFIX + name)
            # Equality, not the name alone, decides: a buffer the EMA copy keeps on its own stays.
            if ema is not None and raw is not None and torch.equal(ema, raw):
                del state[EMA_PREFIX + name]
                shared.append(name)
        return shared

    def _warn_if_schedule_changed(self, saved: int | None) -> None:
        """A resumed run whose schedule has another length than the checkpoint's (a new
        trainer.max_steps with model.schedule.total_steps null) takes another learning-rate curve."""
        if saved is None or self._trainer is None or self.total_steps() == saved:
            return
        source = "model.schedule.total_steps" if self.schedule.get("total_steps") is not None else \
            "trainer.max_steps, as model.schedule.total_steps is null"
        warnings.warn(f"the checkpoint's learning-rate schedule is {saved} steps long, this run's is "
                      f"{self.total_steps()} (from {source}): the learning-rate curve changes from here on. "
                      f"Set model.schedule.total_steps={saved} to resume the same schedule.", stacklevel=2)

    def _gather(self, value: Any) -> list[Any]:
        """`value` of every rank (a collective: checkpoints are dumped on every rank)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return [value]
        values: list[Any] = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(values, value)
        return values

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Frozen pretrained networks are not saved: take them from this freshly built module so
        # the (strict) load sees every key.
        state = checkpoint["state_dict"]
        for key, value in self.state_dict().items():
            if key.startswith(self._unsaved_prefixes()):
                state[key] = value
        for name in checkpoint.get(EMA_SHARED_KEY, ()):
            state[EMA_PREFIX + name] = state[RAW_PREFIX + name]
        training = checkpoint.get("training_state")
        if training is None:
            return
        self._warn_if_schedule_changed(training.get("schedule_total_steps"))
        self._consecutive_nonfinite = int(training["consecutive_nonfinite"])
        if self._code_hist is not None and training["code_hist"] is not None:
            self._code_hist = training["code_hist"].clone()
        world_size = self.trainer.world_size if self._trainer is not None else 1
        states = training["rng"]
        if len(states) == world_size:
            self._rng_state = states[self.global_rank]
        else:
            warnings.warn(f"the checkpoint's random states are for {len(states)} rank(s), this run has {world_size}; "
                          "training goes on from freshly seeded generators", stacklevel=2)
