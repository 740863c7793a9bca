"""What most likely made a run's loss or gradient non-finite, in words the user can act on."""

from __future__ import annotations

from dpokit.config import Config


def likely_cause(cfg: Config, bad_loss: bool, applied_steps: int) -> str:
    causes = []
    if cfg.train.mixed_precision == "fp16" or cfg.model.dtype == "float16":
        causes.append("float16 overflow: use train.mixed_precision=bf16 (or no) and model.dtype=bfloat16 or float32")
    if bad_loss and applied_steps == 0:
        causes.append(
            "the loss is non-finite before any update: look for empty or fully truncated completions "
            "(`dpokit doctor` on the data) or a model that already outputs NaN in this dtype"
        )
    elif bad_loss:
        causes.append(
            f"the weights diverged: the learning rate is probably too high (optim.lr={cfg.optim.lr:g}); lower it"
        )
    else:
        causes.append(
            f"exploding gradients: lower optim.lr (now {cfg.optim.lr:g})"
            + ("" if cfg.optim.max_grad_norm > 0 else " and turn clipping on (optim.max_grad_norm=1.0)")
        )
    return "; ".join(causes)
