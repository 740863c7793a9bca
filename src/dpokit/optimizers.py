"""The optimizer named by optim.name, over the parameter groups training/ builds.

adamw       torch.optim.AdamW: two moments per trainable parameter in its dtype (8 bytes in float32),
            with the fused kernel (optim.fused, the default; HF Trainer's adamw_torch_fused) or for-each
adamw_8bit  bitsandbytes' AdamW8bit (Dettmers et al. 2022, *8-bit Optimizers via Block-wise
            Quantization*, arXiv 2110.02861): both moments block-wise quantized to 8 bits
            (2 bytes per parameter plus one float32 scale per 256-value block); tensors under
            4096 values keep float32 state, as bitsandbytes does by default
"""

from __future__ import annotations

import torch

from dpokit.config import Config, ConfigError

OPTIMIZERS = ("adamw", "adamw_8bit")


def build_optimizer(cfg: Config, param_groups: list[dict], sharded: bool = False) -> torch.optim.Optimizer:
    """optim.name's optimizer with optim.lr / betas / eps / weight_decay; groups may override weight_decay.

    sharded: FSDP or DeepSpeed wraps the parameters; AdamW then runs for-each, whatever optim.fused says.
    """
    o = cfg.optim
    kwargs = {"lr": o.lr, "betas": (o.adam_beta1, o.adam_beta2), "eps": o.adam_eps, "weight_decay": o.weight_decay}
    if o.name == "adamw":
        params = [p for group in param_groups for p in group["params"]]
        return torch.optim.AdamW(
            param_groups, **kwargs, fused=True if o.fused and not sharded and fusable(params) else None
        )
    if o.name == "adamw_8bit":
        return _bitsandbytes().optim.AdamW8bit(param_groups, **kwargs)
    raise ConfigError(f"config key 'optim.name' must be one of {', '.join(OPTIMIZERS)}; got {o.name!r}")


def fusable(params) -> bool:
    """Whether torch's fused AdamW kernel takes these parameters: floating tensors on CPU or CUDA.

    The fused kernel updates each parameter in place. The for-each default allocates sqrt(exp_avg_sq)
    and its bias-corrected quotient per parameter: two transient copies of the largest tensor (2 x the
    519 MiB embedding of a Qwen2.5-0.5B shape in float32) while weights, gradients and AdamW state
    are all resident, which is where a full fine-tune peaks (docs/benchmarks.md). Same update, to
    float32 rounding.
    """
    return all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)


def optimizer_state_bytes_per_param(name: str, param_bytes: int = 4) -> float:
    """Bytes of optimizer state per trainable parameter of `param_bytes` (what `dpokit plan` counts).

    AdamW keeps its two moments in the parameter's dtype; AdamW8bit keeps two 8-bit moments and one
    float32 scale per 256-value block of each.
    """
    return {"adamw": 2.0 * param_bytes, "adamw_8bit": 2.0 + 2 * 4 / 256}[name]


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(
            "optim.name=adamw_8bit needs bitsandbytes: pip install 'dpokit[quantization]' (or set optim.name=adamw)"
        ) from None
    return bitsandbytes
