"""Optimizer parameter groups and learning-rate schedules driven by the module's own step counter."""

from __future__ import annotations

import math
from collections.abc import Iterable

from torch import nn


def decay_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                 no_decay_names: set[str] = frozenset()) -> list[dict]:
    """Two AdamW groups: weight decay on matrices, none on 1-D params (norms, biases) and on the
    tokens / embeddings a model names in `no_decay_names` (TiTok's recipe)."""
    decay, no_decay = [], []
    for name, param in named_params:
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or name in no_decay_names else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base lr: linear warmup from 0, then cosine down to `min_lr_ratio`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def constant(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    return (step + 1) / warmup_steps if warmup_steps > 0 and step < warmup_steps else 1.0


SCHEDULES = {"cosine": warmup_cosine, "constant": constant}


def lr_multiplier(name: str, step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    if name not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {name!r}; expected one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](step, warmup_steps, total_steps, min_lr_ratio)
