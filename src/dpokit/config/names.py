""" "Did you mean" for the names users bring from TRL's DPOConfig and HF's TrainingArguments.

difflib finds a typo ('loss.bta' -> 'loss.beta') but not a name from another library: it offers
'optim.warmup_ratio' for 'optim.learning_rate'. An unknown key whose last part is a TRL/HF name, or a
dpokit key's own name under the wrong section ('train.lr'), is pointed to the dpokit key instead,
wherever it was written: top level or under any section.
"""

from __future__ import annotations

import dataclasses
import functools
import typing

from dpokit.config.errors import suggest

# TRL (DPOConfig, ModelConfig) / HF TrainingArguments name -> dpokit key; only names with an equivalent.
TRL_NAMES = {
    "learning_rate": "optim.lr",
    "per_device_train_batch_size": "train.batch_size",
    "per_device_eval_batch_size": "train.eval_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "num_train_epochs": "train.epochs",
    "max_prompt_length": "data.max_prompt_length",
    "max_length": "data.max_length",
    "max_steps": "train.max_steps",
    "warmup_ratio": "optim.warmup_ratio",
    "warmup_steps": "optim.warmup_steps",
    "lr_scheduler_type": "optim.scheduler",
    "weight_decay": "optim.weight_decay",
    "max_grad_norm": "optim.max_grad_norm",
    "adam_beta1": "optim.adam_beta1",
    "adam_beta2": "optim.adam_beta2",
    "adam_epsilon": "optim.adam_eps",
    "optim": "optim.name",
    "beta": "loss.beta",
    "loss_type": "loss.type",
    "label_smoothing": "loss.label_smoothing",
    "ref_model_sync_steps": "loss.ref_sync_steps",
    "ref_model_mixup_alpha": "loss.ref_sync_alpha",
    "output_dir": "out_dir",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "seed": "train.seed",
    "logging_steps": "train.logging_steps",
    "eval_steps": "train.eval_steps",
    "save_steps": "train.save_steps",
    "save_total_limit": "train.save_total_limit",
    "resume_from_checkpoint": "train.resume",
    "report_to": "train.report_to",
    "bf16": "train.mixed_precision",
    "fp16": "train.mixed_precision",
    "hub_model_id": "train.push_to_hub",
    "hub_private_repo": "train.hub_private",
    "precompute_ref_log_probs": "speed.ref_cache",
    "padding_free": "speed.packing",
    "model_name_or_path": "model.name_or_path",
    "torch_dtype": "model.dtype",
    "use_peft": "lora.enabled",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
}


@functools.cache
def _config_keys() -> tuple[str, ...]:
    """Every dotted key of the train config (imported here: config.schema loads torch through dpokit.losses)."""
    from dpokit.config.schema import Config

    hints = typing.get_type_hints(Config)
    keys = []
    for f in dataclasses.fields(Config):
        tp = hints[f.name]
        keys += [f"{f.name}.{sub.name}" for sub in dataclasses.fields(tp)] if dataclasses.is_dataclass(tp) else [f.name]
    return tuple(keys)


@functools.cache
def _known_names() -> dict[str, str]:
    """Last part of a key -> the dpokit key: TRL/HF names, then each dpokit key whose last part no other key shares."""
    leaves: dict[str, list[str]] = {}
    for key in _config_keys():
        leaves.setdefault(key.rsplit(".", 1)[-1], []).append(key)
    own = {leaf: keys[0] for leaf, keys in leaves.items() if len(keys) == 1}
    return {**own, **TRL_NAMES}


def _root(valid: list[str]) -> str | None:
    """Where the train config sits when every valid key is one of its keys under one prefix ("" or "train." in a
    pipeline); None elsewhere (a pipeline's own sections), where TRL names mean nothing."""
    keys = _config_keys() + tuple({key.split(".")[0] for key in _config_keys()})  # the top level lists sections
    roots = set()
    for key in valid:
        match = next((key[: len(key) - len(k)] for k in keys if key == k or key.endswith(f".{k}")), None)
        if match is None:
            return None
        roots.add(match)
    return roots.pop() if len(roots) == 1 else None


def suggest_key(key: str, valid: list[str]) -> str:
    """'; did you mean X?' for an unknown config key: the dpokit key of a TRL/HF name, else the closest valid key."""
    target = _known_names().get(key.rsplit(".", 1)[-1])
    root = _root(valid) if target else None
    if root is not None and f"{root}{target}" != key:
        return f"; did you mean '{root}{target}'?"
    return suggest(key, valid)
