"""The optimizer (optim.name: AdamW or 8-bit AdamW; no decay on biases and norms) and its learning-rate schedule."""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler

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
    return build_optimizer(cfg, groups, sharded)  # optim.name: AdamW (fused unless sharded), or bitsandbytes' 8-bit AdamW


def total_steps_for(cfg: Config, micro_per_epoch: int) -> int:
    """Optimizer steps of the run: train.max_steps, else train.epochs over the data (global micro-batches per epoch)."""
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * micro_per_epoch / cfg.train.grad_accum))


def make_schedule(cfg: Config, optimizer, total_steps: int):
    warmup = cfg.optim.warmup_steps or math.ceil(cfg.optim.warmup_ratio * total_steps)
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.optim.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
