"""The tables of `dpokit config --from` (config/translate.py): each Axolotl and TRL key, and what it becomes.

A key missing from both its format's table and translate_rules.SHARED is listed as not translated.
"""

from __future__ import annotations

from typing import Any

from dpokit.config.translate_rules import (
    DEFAULT,
    QLORA_NOTE,
    SCHEDULERS,
    Rule,
    Setting,
    Skipped,
    choice,
    flag,
    none,
    number,
    optimizer,
    same,
)

# --- Axolotl --------------------------------------------------------------------------------------------------------


def adapter(key: str, value: Any, raw: dict) -> list:
    if value not in ("lora", "qlora"):
        return [Skipped(key, value, "dpokit trains LoRA adapters (lora.enabled) or the whole model")]
    out = [Setting("lora.enabled", True, (key,))]
    if value == "qlora":  # Axolotl's qlora is LoRA on a 4-bit base (it asks for load_in_4bit too)
        out.append(Setting("model.quantization", "nf4", (key,), QLORA_NOTE))
    return out


def lora_targets(key: str, value: Any, raw: dict) -> list:
    if raw.get("lora_target_linear"):  # Axolotl adds these to every linear layer: all-linear covers them
        return [Skipped(key, value, "lora_target_linear: true targets every linear layer already")]
    return [Setting("lora.target_modules", value, (key,))]


# Axolotl's DPO dataset types are TEMPLATE.NAME (prompt_strategies/dpo/): NAME says which columns are read, TEMPLATE
# (chatml, llama3, zephyr, ...) which chat markers are written around them. -> (data.columns, what Axolotl reads)
DATASET_TYPES = {
    "intel": ({"prompt": "question"}, "question, chosen, rejected and an optional system"),
    "icr": ({"prompt": "input"}, "input, chosen, rejected and an optional system"),
    "argilla": (
        {"prompt": "instruction", "chosen": "chosen_response", "rejected": "rejected_response"},
        "the first of prompt/input/question/instruction, chosen(_response), rejected(_response) and an optional "
        "system (mapped here to argilla/ultrafeedback-binarized-preferences' columns)",
    ),
    "prompt_pairs": ({}, "prompt, chosen, rejected and an optional system"),
    "ultra": ({}, "prompt and chosen/rejected message lists"),
}


def dataset_type(key: str, value: Any) -> list:
    template, _, name = value.rpartition(".") if isinstance(value, str) else ("", "", None)
    if name not in DATASET_TYPES:
        why = "dpokit detects each row's layout itself (docs/data.md): check that it reads your columns"
        return [Skipped(key, value, why)]
    columns, reads = DATASET_TYPES[name]
    note = (
        f"{value} reads {reads}, and writes {template} markers around the text. dpokit writes none: text rows are "
        "tokenised as written, message lists through the tokenizer's chat template (docs/data.md); a system column "
        "is not read"
    )
    if not columns:
        return [Skipped(key, value, f"dpokit reads these columns without a mapping. {note}")]
    return [Setting("data.columns", columns, (key,), note)]


def datasets(path_key: str, split_key: str) -> Rule:
    """Axolotl's datasets / test_datasets: dpokit reads one file each (data.path, data.eval_path)."""

    def rule(key, value, raw):
        entries = value if isinstance(value, list) else [value]
        if not entries or not isinstance(entries[0], (dict, str)):
            return [Skipped(key, value, "expected a list of datasets")]
        first = entries[0] if isinstance(entries[0], dict) else {"path": entries[0]}
        out: list = []
        for sub, sub_value in first.items():
            where = f"{key}[0].{sub}" if isinstance(entries[0], dict) else f"{key}[0]"
            if sub == "path":
                out.append(Setting(path_key, sub_value, (where,)))
            elif sub == "split":
                out.append(Setting(split_key, sub_value, (where,)))
            elif sub == "type":
                out += dataset_type(where, sub_value)
            else:
                out.append(
                    Skipped(where, sub_value, "no dpokit equivalent; data.path names one file, folder or hub id")
                )
        out += [
            Skipped(f"{key}[{i}]", entry, f"dpokit reads one {path_key}: join the datasets into one file")
            for i, entry in enumerate(entries[1:], 1)
        ]
        return out

    return rule


def val_set_size(key: str, value: Any, raw: dict) -> list:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1:
        return [
            Setting(
                "data.eval_fraction",
                float(value),
                (key,),
                "dpokit holds out whole prompts (no prompt on both sides), a seeded share of the rows",
            )
        ]
    return [Skipped(key, value, "a row count; dpokit's data.eval_fraction is a share in [0, 1)")]


def bf16(key: str, value: Any, raw: dict) -> list:
    """Axolotl's bf16 loads the weights in bfloat16 (its torch_dtype) and turns on the Trainer's bf16 autocast."""
    if not value:
        return [Skipped(key, value, f"false: {DEFAULT} (float32)")]
    note = "auto: Axolotl uses bf16 where the GPU has it; dpokit needs it said" if value == "auto" else ""
    return [Setting("model.dtype", "bfloat16", (key,), note), Setting("train.mixed_precision", "bf16", (key,), note)]


def gradient_checkpointing(key: str, value: Any, raw: dict) -> list:
    note = f"{value}: Axolotl's offloading variant; dpokit recomputes on the GPU" if isinstance(value, str) else ""
    return [Setting("train.gradient_checkpointing", bool(value), (key,), note)]


WANDB_RUN = "dpokit names the W&B run after out_dir, in the W&B project 'dpokit'"
AXOLOTL_RULES: dict[str, Rule] = {
    "base_model": same("model.name_or_path"),
    "revision_of_model": same("model.revision"),
    "base_model_config": none("dpokit reads the model's config from model.name_or_path"),
    "model_type": none("dpokit loads every model with transformers' Auto classes"),
    "tokenizer_type": none("dpokit loads the model's own tokenizer with AutoTokenizer"),
    "tokenizer_config": none("dpokit loads the tokenizer from model.name_or_path"),
    "chat_template": none("dpokit renders message lists with the tokenizer's own chat template"),
    "adapter": adapter,
    "lora_target_modules": lora_targets,
    "lora_target_linear": flag("lora.target_modules", "all-linear", "false: only lora_target_modules"),
    "datasets": datasets("data.path", "data.split"),
    "test_datasets": datasets("data.eval_path", "data.eval_split"),
    "val_set_size": val_set_size,
    "sequence_len": same(
        "data.max_length",
        "Axolotl leaves the prompt limit to TRL; dpokit's is data.max_prompt_length (max_length // 2)",
    ),
    "max_prompt_len": same("data.max_prompt_length"),
    "micro_batch_size": same("train.batch_size"),
    "eval_batch_size": same("train.eval_batch_size"),
    "num_epochs": same("train.epochs"),
    "lr_scheduler": choice("optim.scheduler", SCHEDULERS, "dpokit's optim.scheduler is linear, cosine or constant"),
    "optimizer": optimizer,
    "bf16": bf16,
    "fp16": flag("train.mixed_precision", "fp16", f"false: {DEFAULT} (float32)"),
    "bfloat16": flag("model.dtype", "bfloat16", f"false: {DEFAULT} (float32)"),
    "float16": flag("model.dtype", "float16", f"false: {DEFAULT} (float32)"),
    "gradient_checkpointing": gradient_checkpointing,
    "flash_attention": flag("speed.attention", "flash", "false: dpokit picks the attention (speed.attention: auto)"),
    "sdp_attention": flag("speed.attention", "sdpa", "false: dpokit picks the attention (speed.attention: auto)"),
    "wandb_project": lambda key, value, raw: [
        Setting("train.report_to", ["wandb"], (key,), f"{WANDB_RUN}, not {value!r}")
    ],
    "hub_model_id": same("train.push_to_hub"),
    "simpo_gamma": same("loss.simpo_gamma"),
    "dpo_label_smoothing": number("loss.label_smoothing"),
    "cpo_alpha": none(
        "dpokit's simpo has no NLL term: loss.type [simpo, sft] with loss.weights [1, cpo_alpha] adds it"
    ),
    "dpo_use_weighting": same("loss.use_weighting"),
    "kto_desirable_weight": number("loss.desirable_weight"),
    "kto_undesirable_weight": number("loss.undesirable_weight"),
    "early_stopping_patience": same(
        "detectors.early_stop_patience",
        "dpokit stops after that many consecutive rises of eval_loss past detectors.eval_rise_count",
    ),
    "strict": none("dpokit's config is always strict: unknown keys are errors"),
    "dataset_prepared_path": none("dpokit tokenises the data at the start of each run"),
}
for _key in ("wandb_run_id", "wandb_entity", "wandb_name", "wandb_watch", "wandb_log_model"):
    AXOLOTL_RULES[_key] = none(WANDB_RUN)


def axolotl_defaults(raw: dict) -> list:
    """Axolotl's defaults that change the numbers where dpokit's differ, for keys the file leaves out."""
    out = []
    if "lr_scheduler" not in raw:
        out.append(Setting("optim.scheduler", "cosine", (), "Axolotl's default lr_scheduler"))
    if "warmup_steps" not in raw and "warmup_ratio" not in raw:
        out.append(Setting("optim.warmup_ratio", 0.03, (), "Axolotl's default warmup, 3% of the steps (at most 100)"))
    if "sequence_len" not in raw:
        out.append(Setting("data.max_length", 512, (), "Axolotl's default sequence_len"))
    if raw.get("adapter") in ("lora", "qlora") and "lora_dropout" not in raw:
        out.append(Setting("lora.dropout", 0.0, (), "Axolotl's default lora_dropout"))
    return out


# --- TRL (DPOConfig, and the model and script arguments the `trl dpo` command reads from the same YAML) -------------


def sync_ref(key: str, value: Any, raw: dict) -> list:
    """TR-DPO: sync_ref_model turns it on; TRL's defaults are 512 steps and alpha 0.6 (dpokit's alpha default too)."""
    if not raw.get("sync_ref_model"):
        return [
            Skipped(
                key,
                value,
                f"false: a fixed reference, {DEFAULT}" if key == "sync_ref_model" else "sync_ref_model is not true",
            )
        ]
    if key == "ref_model_mixup_alpha":
        return [Setting("loss.ref_sync_alpha", float(value), (key,))]
    steps = tuple(k for k in ("sync_ref_model", "ref_model_sync_steps") if k in raw)
    return [Setting("loss.ref_sync_steps", raw.get("ref_model_sync_steps", 512), steps)]


def push_to_hub(key: str, value: Any, raw: dict) -> list:
    if raw.get("push_to_hub") and raw.get("hub_model_id"):
        return [Setting("train.push_to_hub", raw["hub_model_id"], ("push_to_hub", "hub_model_id"))]
    why = (
        "push_to_hub is not true"
        if key == "hub_model_id"
        else "dpokit pushes when train.push_to_hub names the repo (hub_model_id)"
    )
    return [Skipped(key, value, why if value else f"false: {DEFAULT}")]


def model_init_kwargs(key: str, value: Any, raw: dict) -> list:
    if not isinstance(value, dict):
        return [Skipped(key, value, "expected a mapping")]
    out: list = []
    for sub, sub_value in value.items():
        if sub in ("torch_dtype", "dtype"):
            out += DTYPE(f"{key}.{sub}", sub_value, raw)
        elif sub in ("attn_implementation", "trust_remote_code", "revision"):
            out.append(Setting(f"model.{sub}", sub_value, (f"{key}.{sub}",)))
        else:
            out.append(Skipped(f"{key}.{sub}", sub_value, "no dpokit equivalent"))
    return out


DTYPE = choice(
    "model.dtype",
    {d: d for d in ("auto", "bfloat16", "float16", "float32")},
    "model.dtype is auto, bfloat16, float16 or float32",
)
F_DIVERGENCES = {
    "reverse_kl": "reverse_kl",
    "forward_kl": "forward_kl",
    "js_divergence": "js",
    "alpha_divergence": "alpha_divergence",
}
TRL_RULES: dict[str, Rule] = {
    "model_name_or_path": same("model.name_or_path"),
    "model_revision": same("model.revision"),
    "torch_dtype": DTYPE,
    "dtype": DTYPE,
    "attn_implementation": same("model.attn_implementation"),
    "model_init_kwargs": model_init_kwargs,
    "use_peft": same("lora.enabled"),
    "lora_target_modules": same("lora.target_modules"),
    "dataset_name": same("data.path"),
    "dataset_train_split": same("data.split"),
    "dataset_test_split": none("set data.eval_path to the dataset and data.eval_split to this split"),
    "num_train_epochs": same("train.epochs"),
    "per_device_train_batch_size": same("train.batch_size"),
    "per_device_eval_batch_size": same("train.eval_batch_size"),
    "lr_scheduler_type": choice(
        "optim.scheduler", SCHEDULERS, "dpokit's optim.scheduler is linear, cosine or constant"
    ),
    "optim": optimizer,
    # HF Trainer's bf16/fp16 is autocast only; the weights' dtype is model_init_kwargs' (model.dtype)
    "bf16": flag("train.mixed_precision", "bf16", f"false: {DEFAULT} (no autocast)"),
    "fp16": flag("train.mixed_precision", "fp16", f"false: {DEFAULT} (no autocast)"),
    "gradient_checkpointing": same("train.gradient_checkpointing"),
    "max_length": same("data.max_length"),
    "max_prompt_length": same("data.max_prompt_length"),
    "max_completion_length": none("dpokit cuts each completion to fit data.max_length (prompt + completion)"),
    "truncation_mode": none("dpokit always cuts the prompt from the left (TRL's keep_end)"),
    "label_smoothing": number("loss.label_smoothing"),
    "use_weighting": same("loss.use_weighting"),
    "ld_alpha": same("loss.ld_alpha"),
    "discopop_tau": number("loss.discopop_tau"),
    "f_divergence_type": choice(
        "loss.f_divergence_type", F_DIVERGENCES, "dpokit's f-divergences: reverse_kl, forward_kl, js, alpha_divergence"
    ),
    "f_alpha_divergence_coef": number("loss.f_alpha_divergence_coef"),
    "sync_ref_model": sync_ref,
    "ref_model_sync_steps": sync_ref,
    "ref_model_mixup_alpha": sync_ref,
    "push_to_hub": push_to_hub,
    "hub_model_id": push_to_hub,
    "hub_private_repo": same("train.hub_private"),
    "run_name": none(WANDB_RUN),
}
