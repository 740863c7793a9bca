"""Checks of a built config that its types cannot express: choices, ranges, settings that contradict each other."""

from __future__ import annotations

import difflib
import re

from dpokit.config.errors import ConfigError, check_choice, excerpt
from dpokit.config.schema import Config
from dpokit.losses import (
    LOSSES,
    REFERENCE_FREE,
    UNPAIRED_LOSSES,
    is_unpaired,
    loss_names,
    needs_reference,
    validate_loss_config,
)


# loss.beta scales log-prob margins of tens to hundreds of nats: DPO uses 0.01-0.5, IPO's tau and ORPO's lambda
# ~0.1, SimPO 2-10. At 1e308 every loss is inf or NaN and the run ends with nothing to show; 100 leaves a
# 10x margin over the largest published value.
MAX_BETA = 100.0


def validate(cfg: Config) -> None:
    """Check every setting; also resolves data.max_prompt_length=null to max_length // 2, so readers get an int.

    The checks run in this order, and the first that fails is the error a user sees."""
    _validate_model(cfg)
    _validate_modes(cfg)
    _validate_combinations(cfg)
    _validate_loss_type(cfg)
    _validate_sizes(cfg)
    _validate_fractions(cfg)
    _validate_run_length(cfg)
    _validate_counts(cfg)
    _validate_optimizer(cfg)
    _validate_lora(cfg)
    _validate_outputs(cfg)
    _validate_moving_reference(cfg)
    _validate_router_aux(cfg)
    _validate_retention_and_mixing(cfg)


def _validate_model(cfg: Config) -> None:
    """model.dtype, model.ref_dtype and model.quantization, and whether lora.enabled allows them; lora.save."""
    check_choice("model.dtype", cfg.model.dtype, ("float32", "bfloat16", "float16", "auto"))
    check_choice("lora.save", cfg.lora.save, ("adapter", "merged"))
    if cfg.model.ref_dtype is not None:
        check_choice("model.ref_dtype", cfg.model.ref_dtype, ("float32", "bfloat16", "float16"))
    if cfg.model.ref_dtype is not None and cfg.lora.enabled:
        raise ConfigError(
            "model.ref_dtype cannot be combined with lora.enabled: with LoRA the reference is the policy's "
            "own base with its adapters disabled, there is no copy to cast"
        )
    check_choice("model.quantization", cfg.model.quantization, ("none", "nf4"))
    if cfg.model.quantization != "none" and not cfg.lora.enabled:
        raise ConfigError(
            "model.quantization=nf4 trains LoRA adapters on a frozen 4-bit base (QLoRA): set lora.enabled=true"
        )


def _validate_modes(cfg: Config) -> None:
    """The settings that name one of a few modes: optimizer, scheduler, precision, task, attention kernel."""
    check_choice("optim.name", cfg.optim.name, ("adamw", "adamw_8bit"))
    check_choice("optim.scheduler", cfg.optim.scheduler, ("linear", "cosine", "constant"))
    check_choice("train.mixed_precision", cfg.train.mixed_precision, ("no", "bf16", "fp16"))
    check_choice("train.task", cfg.train.task, ("preference", "sft"))
    check_choice("speed.attention", cfg.speed.attention, ("auto", "sdpa", "flex", "flash"))


def _validate_combinations(cfg: Config) -> None:
    """What data.vision and model.ref_name_or_path cannot be combined with (yet)."""
    if cfg.data.vision and (cfg.train.task == "sft" or is_unpaired(cfg.loss)):
        raise ConfigError(
            "data.vision=true trains paired (DPO-family) losses only; image rows are not supported by "
            "train.task=sft or KTO yet"
        )
    if cfg.data.vision and (cfg.data.layout != "auto" or cfg.data.columns):
        raise ConfigError(
            "data.vision=true reads prompt/images/chosen/rejected columns (docs/data.md); data.layout and "
            "data.columns do not apply to image rows yet"
        )
    if cfg.data.vision and cfg.train.eval_generate > 0:
        raise ConfigError(
            "train.eval_generate samples from text prompts, and data.vision rows need their images: "
            "set train.eval_generate=0 (sampling with images is not supported yet)"
        )
    if cfg.model.ref_name_or_path and cfg.lora.enabled:
        raise ConfigError(
            "model.ref_name_or_path cannot be combined with lora.enabled: with LoRA the reference is the "
            "policy's base model with its adapters disabled"
        )


def _validate_loss_type(cfg: Config) -> None:
    """loss.type: every name a known loss (with the closest one suggested), and the losses' own settings."""
    valid_losses = sorted(set(LOSSES) | UNPAIRED_LOSSES)
    for name in loss_names(cfg.loss):
        if name not in valid_losses:
            close = difflib.get_close_matches(name[:100], valid_losses, n=1, cutoff=0.5)
            raise ConfigError(
                f"config key 'loss.type': unknown loss {excerpt(name)}"
                + (f"; did you mean {close[0]!r}?" if close else "")
                + f" valid: {', '.join(valid_losses)}"
            )
    try:
        validate_loss_config(cfg.loss)
    except ValueError as e:
        raise ConfigError(f"config key 'loss.type': {e}" if "unknown loss.type" in str(e) else str(e)) from None


def _validate_sizes(cfg: Config) -> None:
    """The sizes that must be positive, loss.beta at most MAX_BETA, and room for a completion in data.max_length;
    resolves data.max_prompt_length=null first."""
    if cfg.data.max_prompt_length is None:
        cfg.data.max_prompt_length = max(1, cfg.data.max_length // 2)  # half the budget for the prompt
    positive = {
        "data.max_length": cfg.data.max_length,
        "data.max_prompt_length": cfg.data.max_prompt_length,
        "train.batch_size": cfg.train.batch_size,
        "train.grad_accum": cfg.train.grad_accum,
        "train.logging_steps": cfg.train.logging_steps,
        "loss.beta": cfg.loss.beta,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key {key!r} must be > 0, got {value}")
    if cfg.loss.beta > MAX_BETA:
        raise ConfigError(
            f"config key 'loss.beta' must be in (0, {MAX_BETA:g}], got {cfg.loss.beta:g}: past it beta times a log-prob margin "
            "overflows and the run ends with no finite loss (DPO uses 0.01-0.5, SimPO 2-10; docs/config.md)"
        )
    if cfg.data.max_length < 2:
        raise ConfigError(
            f"config key 'data.max_length' must be >= 2 (one prompt and one completion token), got {cfg.data.max_length}"
        )
    if cfg.data.max_prompt_length >= cfg.data.max_length:
        raise ConfigError(
            f"data.max_prompt_length ({cfg.data.max_prompt_length}) must be smaller than data.max_length "
            f"({cfg.data.max_length}), or no completion token would fit"
        )


def _validate_fractions(cfg: Config) -> None:
    """Rates and fractions of the data and the doctor: each within [0, 1]."""
    if not 0.0 <= cfg.doctor.unknown_token_warn_rate <= 1.0:
        raise ConfigError(
            f"config key 'doctor.unknown_token_warn_rate' must be in [0, 1], got {cfg.doctor.unknown_token_warn_rate}"
        )
    if not 0.0 <= cfg.data.max_unknown_token_rate <= 1.0:
        raise ConfigError(
            f"config key 'data.max_unknown_token_rate' must be in [0, 1], got {cfg.data.max_unknown_token_rate}"
        )
    if not 0.0 <= cfg.data.max_empty_render_fraction <= 1.0:
        raise ConfigError(
            f"config key 'data.max_empty_render_fraction' must be in [0, 1], got {cfg.data.max_empty_render_fraction}"
        )
    if not 0.0 <= cfg.data.eval_fraction < 1.0:
        raise ConfigError(f"config key 'data.eval_fraction' must be in [0, 1), got {cfg.data.eval_fraction}")


def _validate_run_length(cfg: Config) -> None:
    """optim.lr, and how long training runs (train.max_steps or train.epochs)."""
    if cfg.optim.lr <= 0:
        raise ConfigError(f"config key 'optim.lr' must be > 0, got {cfg.optim.lr}")
    if cfg.train.max_steps == 0 or cfg.train.max_steps < -1:
        raise ConfigError(
            f"config key 'train.max_steps' must be -1 (use train.epochs) or > 0, got {cfg.train.max_steps}"
        )
    if cfg.train.epochs <= 0:
        raise ConfigError(f"config key 'train.epochs' must be > 0, got {cfg.train.epochs}")


def _validate_counts(cfg: Config) -> None:
    """Counts and coefficients that cannot be negative, data.max_rows, and train.seed's range."""
    at_least_zero = {
        "train.eval_steps": cfg.train.eval_steps,
        "train.eval_batch_size": cfg.train.eval_batch_size,
        "train.save_steps": cfg.train.save_steps,
        "train.save_total_limit": cfg.train.save_total_limit,
        "train.max_skipped_steps": cfg.train.max_skipped_steps,
        "train.num_threads": cfg.train.num_threads,
        "optim.warmup_steps": cfg.optim.warmup_steps,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.max_grad_norm": cfg.optim.max_grad_norm,
        "lora.dropout": cfg.lora.dropout,
        "speed.logps_chunk_size": cfg.speed.logps_chunk_size,
        "speed.pack_length": cfg.speed.pack_length,
    }
    for key, value in at_least_zero.items():
        if value < 0:
            raise ConfigError(f"config key {key!r} must be >= 0, got {value}")
    if cfg.data.max_rows is not None and cfg.data.max_rows <= 0:
        raise ConfigError(f"config key 'data.max_rows' must be > 0 or null (all rows), got {cfg.data.max_rows}")
    if not 0 <= cfg.train.seed < 2**32:
        raise ConfigError(f"config key 'train.seed' must be in [0, 2**32), got {cfg.train.seed}")


def _validate_optimizer(cfg: Config) -> None:
    """optim.*: warmup ratio and Adam's betas and epsilon."""
    if not 0.0 <= cfg.optim.warmup_ratio <= 1.0:
        raise ConfigError(f"config key 'optim.warmup_ratio' must be in [0, 1], got {cfg.optim.warmup_ratio}")
    for key, value in (("optim.adam_beta1", cfg.optim.adam_beta1), ("optim.adam_beta2", cfg.optim.adam_beta2)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"config key {key!r} must be in [0, 1), got {value}")
    if cfg.optim.adam_eps <= 0:
        raise ConfigError(f"config key 'optim.adam_eps' must be > 0, got {cfg.optim.adam_eps}")


def _validate_lora(cfg: Config) -> None:
    """lora.*: rank, alpha and dropout."""
    if cfg.lora.r <= 0 or cfg.lora.alpha <= 0:
        raise ConfigError(
            f"config keys 'lora.r' and 'lora.alpha' must be > 0, got r={cfg.lora.r}, alpha={cfg.lora.alpha}"
        )
    if cfg.lora.dropout >= 1.0:
        raise ConfigError(f"config key 'lora.dropout' must be in [0, 1), got {cfg.lora.dropout}")


def _validate_outputs(cfg: Config) -> None:
    """Where the run goes and comes from: train.push_to_hub (a Hub repo id) and train.resume."""
    if cfg.train.push_to_hub is not None and not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", cfg.train.push_to_hub):
        raise ConfigError(
            f"config key 'train.push_to_hub' must be a Hub repo id (owner/name, or name in your own namespace), got {excerpt(cfg.train.push_to_hub)}"
        )
    if cfg.train.resume.strip() == "":
        raise ConfigError("config key 'train.resume' must be auto, never, or the path of a checkpoint folder; got ''")


def _validate_moving_reference(cfg: Config) -> None:
    """TR-DPO's reference sync (loss.ref_sync_*) and beta-DPO's adaptive beta (loss.beta_schedule, loss.beta_adaptive_*)."""
    loss = cfg.loss
    if loss.ref_sync_steps < 0:
        raise ConfigError(
            f"config key 'loss.ref_sync_steps' must be >= 0 (0 = a fixed reference), got {loss.ref_sync_steps}"
        )
    if not 0.0 < loss.ref_sync_alpha <= 1.0:
        raise ConfigError(f"config key 'loss.ref_sync_alpha' must be in (0, 1], got {loss.ref_sync_alpha}")
    if loss.ref_sync_steps > 0:
        if not needs_reference(loss) or cfg.train.task == "sft":
            raise ConfigError(
                f"loss.ref_sync_steps={loss.ref_sync_steps}: loss.type {loss.type!r} (train.task={cfg.train.task}) "
                "uses no reference, so there is none to sync; set loss.ref_sync_steps=0"
            )
        if cfg.model.quantization != "none":
            raise ConfigError(
                f"loss.ref_sync_steps cannot be combined with model.quantization={cfg.model.quantization}: the moving "
                "reference is a full copy of the merged model, which a 4-bit base cannot hold; "
                "set loss.ref_sync_steps=0 or model.quantization=none"
            )
    check_choice("loss.beta_schedule", loss.beta_schedule, ("constant", "adaptive"))
    if loss.beta_schedule == "adaptive":
        names = loss_names(loss)
        if cfg.train.task == "sft" or is_unpaired(loss) or any(name in REFERENCE_FREE for name in names):
            raise ConfigError(
                f"loss.beta_schedule=adaptive (beta-DPO) needs the implicit reward margins of pairs against a "
                f"reference: loss.type {loss.type!r} (train.task={cfg.train.task}) has none; use a reference-based "
                "paired loss (e.g. sigmoid) or loss.beta_schedule=constant"
            )
    if loss.beta_adaptive_alpha < 0:
        raise ConfigError(f"config key 'loss.beta_adaptive_alpha' must be >= 0, got {loss.beta_adaptive_alpha}")
    if not 0.0 <= loss.beta_adaptive_momentum < 1.0:
        raise ConfigError(
            f"config key 'loss.beta_adaptive_momentum' must be in [0, 1), got {loss.beta_adaptive_momentum}"
        )


def _validate_router_aux(cfg: Config) -> None:
    """loss.router_aux_coef: a mixture-of-experts model's load-balancing loss weight (a dense model refuses > 0 at its
    first step, steps/router_aux.py, as only the loaded model says whether it has a router)."""
    if cfg.loss.router_aux_coef is not None and not cfg.loss.router_aux_coef >= 0:
        raise ConfigError(
            f"config key 'loss.router_aux_coef' must be >= 0 (null = the model config's router_aux_loss_coef), "
            f"got {cfg.loss.router_aux_coef}"
        )


def _validate_retention_and_mixing(cfg: Config) -> None:
    """data.retention_path, and SFT mixing (data.sft_mix_path, data.sft_mix_batch_size, loss.sft_mix_weight)."""
    for key, value in (
        ("detectors.forgetting_nll_delta", cfg.detectors.forgetting_nll_delta),
        ("detectors.forgetting_nll_delta_fraction", cfg.detectors.forgetting_nll_delta_fraction),
        ("data.sft_mix_batch_size", cfg.data.sft_mix_batch_size),
    ):
        if value < 0:
            raise ConfigError(f"config key {key!r} must be >= 0, got {value}")
    if not cfg.data.sft_mix_path:
        if cfg.data.sft_mix_batch_size:
            raise ConfigError(
                "config key 'data.sft_mix_batch_size' is set but data.sft_mix_path is not: give the SFT file to mix in"
            )
        return
    if not cfg.loss.sft_mix_weight > 0:
        raise ConfigError(
            f"config key 'loss.sft_mix_weight' must be > 0 with data.sft_mix_path, got {cfg.loss.sft_mix_weight}"
        )
    if cfg.train.task == "sft":
        raise ConfigError(
            "data.sft_mix_path mixes SFT rows into preference training; with train.task=sft put them in data.path"
        )
    if is_unpaired(cfg.loss):
        raise ConfigError(
            f"data.sft_mix_path is supported with the paired (DPO-family) losses only, not loss.type={cfg.loss.type!r} "
            "(the unpaired step has no mixing hook)"
        )
