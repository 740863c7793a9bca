"""The optimizer (optim.name: AdamW or 8-bit AdamW; no decay on biases and norms) and its learning-rate schedule."""

from __future__ import annotations

import functools
import math

import torch

from dpokit.config import Config
from dpokit.optimizers import build_optimizer


def make_optimizer(cfg: Config, policy, sharded: bool = False) -> torch.optim.Optimizer:
    trainable = [p for p in policy.parameters() if p.requires_grad]
    # As HF's Trainer: biases and norm weights are not decayed (decay would pull norms towards 0).
    no_decay = {id(p) for n, p in policy.named_parameters() if p.requires_grad and ("bias" in n or "norm" in n)}
    groups = [
        {"params": [p for p in trainable if id(p) not in no_decay]},
        {"params": [p for p in trainable if id(p) in no_decay], "weight_decay": 0.0},
    ]
    # Only groups with parameters: LoRA has no trainable bias or norm, and ZeRO-3 drops an empty group, leaving the
    # schedule one learning rate too many (ValueError in its first step).
    groups = [g for g in groups if g["params"]]
    return build_optimizer(
        cfg, groups, sharded
    )  # optim.name: AdamW (fused unless sharded), or bitsandbytes' 8-bit AdamW


def total_steps_for(cfg: Config, micro_per_epoch: int) -> int:
    """Optimizer steps of the run: train.max_steps, else train.epochs over the data (global micro-batches per epoch)."""
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * micro_per_epoch / cfg.train.grad_accum))


def make_schedule(cfg: Config, optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """optim.scheduler with warmup (optim.warmup_steps, else optim.warmup_ratio of the steps), as transformers'
    get_scheduler("linear" | "cosine" | "constant_with_warmup") computes it (tests/test_first_screen.py compares them).

    Written here rather than imported: transformers.optimization imports peft, and peft imports bitsandbytes,
    which on an AVX-512 bf16 CPU asks the Hub for a kernel and prints a warning about remote code at every run.
    """
    warmup = cfg.optim.warmup_steps or math.ceil(cfg.optim.warmup_ratio * total_steps)
    factor = functools.partial(_LR_FACTORS[cfg.optim.scheduler], warmup=warmup, total=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _warming_up(step: int, warmup: int) -> float:
    return float(step) / float(max(1, warmup))


def _linear(step: int, *, warmup: int, total: int) -> float:
    """0 -> 1 over the warmup, then 1 -> 0 at the last step."""
    if step < warmup:
        return _warming_up(step, warmup)
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def _cosine(step: int, *, warmup: int, total: int) -> float:
    """0 -> 1 over the warmup, then half a cosine down to 0 at the last step."""
    if step < warmup:
        return _warming_up(step, warmup)
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def _constant(step: int, *, warmup: int, total: int) -> float:
    """0 -> 1 over the warmup, then 1."""
    return _warming_up(step, warmup) if step < warmup else 1.0


_LR_FACTORS = {"linear": _linear, "cosine": _cosine, "constant": _constant}
