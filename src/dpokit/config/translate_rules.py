"""The rules of `dpokit config --from` (config/translate.py): what each Axolotl or TRL key becomes in a dpokit config.

A rule takes (key, value, the whole foreign mapping) and returns Settings (dpokit keys with the foreign keys they
came from, and a note where the meaning differs) or Skipped entries (not translated, with why). The tables of
keys are at the end; the loss, whose type and beta several foreign keys decide together, is one function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from dpokit.config.errors import ConfigError, excerpt

AXOLOTL = "an Axolotl DPO config"
TRL = "TRL DPOConfig arguments"


@dataclass
class Setting:
    key: str  # dotted dpokit key
    value: Any
    sources: tuple[str, ...]  # the foreign keys it came from; empty: the foreign tool's default for an absent key
    note: str = ""  # how the meaning differs, when it does


@dataclass
class Skipped:
    key: str  # the foreign key (datasets[0].name for part of a list entry)
    value: Any
    why: str


Rule = Callable[[str, Any, dict], list]  # (key, value, the whole mapping) -> [Setting | Skipped, ...]


def same(dotted: str, note: str = "") -> Rule:
    """The value carries over unchanged."""
    return lambda key, value, raw: [Setting(dotted, value, (key,), note)]


def number(dotted: str) -> Rule:
    """A float, also as YAML 1.1 reads one ("5e-7" is a string there)."""

    def rule(key, value, raw):
        try:
            return [Setting(dotted, float(value), (key,))]
        except (TypeError, ValueError):
            return [Skipped(key, value, "not a number")]

    return rule


def as_float(key: str, value: Any) -> float:
    """A number the loss needs at once (rpo_alpha, a beta): anything else is a one-line error naming the key."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: {excerpt(value)} is not a number") from None


def none(why: str) -> Rule:
    """No dpokit equivalent: listed in the output with `why`."""
    return lambda key, value, raw: [Skipped(key, value, why)]


def choice(dotted: str, table: dict, why: str) -> Rule:
    """The value looked up in `table` (dpokit's spelling); one the table lacks is not translated, with `why`."""
    return lambda key, value, raw: (
        [Setting(dotted, table[value], (key,))]
        if isinstance(value, (str, bool)) and value in table
        else [Skipped(key, value, why)]
    )


def flag(dotted: str, on: Any, off_why: str, note: str = "") -> Rule:
    """A boolean that sets `dotted` to `on` when true; false is dpokit's default (`off_why` says so)."""
    return lambda key, value, raw: [Setting(dotted, on, (key,), note)] if value else [Skipped(key, value, off_why)]


# --- rules both formats share ---------------------------------------------------------------------------------------

SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}
OPTIMIZERS = {
    "adamw_torch": ("adamw", False),
    "adamw_hf": ("adamw", False),
    "adamw_torch_fused": ("adamw", True),
    "adamw_bnb_8bit": ("adamw_8bit", None),
    "adamw_8bit": ("adamw_8bit", None),
    "paged_adamw_8bit": ("adamw_8bit", None),
}
DEFAULT = "dpokit's default already"


def optimizer(key: str, value: Any, raw: dict) -> list:
    if not isinstance(value, str) or value not in OPTIMIZERS:
        return [Skipped(key, value, "dpokit's optim.name is adamw or adamw_8bit (bitsandbytes)")]
    name, fused = OPTIMIZERS[value]
    out = [
        Setting(
            "optim.name",
            name,
            (key,),
            "not paged: the 8-bit states stay on the GPU" if value.startswith("paged") else "",
        )
    ]
    if fused is not None:  # adamw_torch is torch's for-each kernel, adamw_torch_fused the fused one: the same numbers
        out.append(Setting("optim.fused", fused, (key,)))
    return out


def save_strategy(key: str, value: Any, raw: dict) -> list:
    if value == "no":
        return [Setting("train.save_steps", 0, (key,))]
    return [
        Skipped(
            key, value, "dpokit saves every train.save_steps steps" + ("" if value == "steps" else ", not per epoch")
        )
    ]


def report_to(key: str, value: Any, raw: dict) -> list:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list):
        return [Skipped(key, value, "not a tracker name or a list of them")]
    kept = [n for n in names if n in ("tensorboard", "wandb", "mlflow")]
    return [
        Setting(
            "train.report_to", kept, (key,), "" if kept == names else "dpokit's trackers: tensorboard, wandb, mlflow"
        )
    ]


def load_in_8bit(key: str, value: Any, raw: dict) -> list:
    return [
        Skipped(
            key,
            value,
            "dpokit has no 8-bit base model; its QLoRA is the 4-bit NF4 base (load_in_4bit)"
            if value
            else f"false: {DEFAULT} (no 8-bit base)",
        )
    ]


QLORA_NOTE = "QLoRA: a frozen 4-bit NF4 base with double quantization (Axolotl's and TRL's bitsandbytes settings)"

SHARED: dict[str, Rule] = {
    "trust_remote_code": same("model.trust_remote_code"),
    "load_in_4bit": flag("model.quantization", "nf4", f"false: {DEFAULT} (model.quantization: none)", QLORA_NOTE),
    "load_in_8bit": load_in_8bit,
    "lora_r": same("lora.r"),
    "lora_alpha": same("lora.alpha"),
    "lora_dropout": number("lora.dropout"),
    "gradient_accumulation_steps": same("train.grad_accum"),
    "max_steps": same("train.max_steps"),
    "learning_rate": number("optim.lr"),
    "warmup_ratio": number("optim.warmup_ratio"),
    "warmup_steps": same("optim.warmup_steps"),
    "weight_decay": number("optim.weight_decay"),
    "adam_beta1": number("optim.adam_beta1"),
    "adam_beta2": number("optim.adam_beta2"),
    "adam_epsilon": number("optim.adam_eps"),
    "max_grad_norm": number("optim.max_grad_norm"),
    "save_strategy": save_strategy,
    "save_steps": same("train.save_steps"),
    "save_total_limit": same("train.save_total_limit"),
    "eval_strategy": none("dpokit evaluates every train.eval_steps steps and at the end, when there is eval data"),
    "eval_steps": same("train.eval_steps"),
    "logging_steps": same("train.logging_steps"),
    "seed": same("train.seed"),
    "output_dir": same("out_dir"),
    "resume_from_checkpoint": same("train.resume"),
    "tf32": none(
        "TF32 matmuls are torch's own switch (torch.backends.cuda.matmul.allow_tf32); dpokit leaves torch's default"
    ),
    "report_to": report_to,
    # dpokit's fast paths are on by default and give the plain path's numbers, so these change nothing there
    "sample_packing": none("dpokit packs pairs without padding by default (speed.packing), with the unpacked numbers"),
    "precompute_ref_log_probs": none("dpokit caches the reference log-probs on disk by default (speed.ref_cache)"),
    "deepspeed": none("dpokit runs on several GPUs through `accelerate launch` (docs/distributed.md)"),
}
SHARED["evaluation_strategy"] = SHARED["eval_strategy"]
SHARED["padding_free"] = SHARED["dpo_padding_free"] = SHARED["sample_packing"]
SHARED["fsdp"] = SHARED["fsdp_config"] = SHARED["deepspeed"]


# --- the loss: rl, the loss type, rpo_alpha and the betas decide loss.type, loss.weights and loss.beta together -----

AXOLOTL_LOSSES = {"dpo": "sigmoid", True: "sigmoid", "ipo": "ipo", "orpo": "orpo", "simpo": "simpo", "kto": "kto"}
LOSS_KEYS = {
    AXOLOTL: ("rl", "dpo_loss_type", "dpo_loss_weights", "rpo_alpha", "trl", "rl_beta", "dpo_beta", "orpo_alpha"),
    TRL: ("loss_type", "loss_weights", "rpo_alpha", "beta"),
}


def loss_settings(raw: dict, kind: str) -> list:
    out: list = []
    rl, names, sources, note = raw.get("rl"), None, (), ""
    type_key, weights_key = ("dpo_loss_type", "dpo_loss_weights") if kind == AXOLOTL else ("loss_type", "loss_weights")
    if kind == AXOLOTL and "rl" not in raw:
        out.append(Setting("train.task", "sft", (), "Axolotl fine-tunes with SFT when there is no rl key (dpokit sft)"))
    elif kind == AXOLOTL:
        if not isinstance(rl, (str, bool)) or rl not in AXOLOTL_LOSSES:
            raise ConfigError(
                f"rl: {excerpt(rl)} has no dpokit equivalent: dpokit trains offline preference losses (rl: dpo, "
                "ipo, orpo, simpo, kto); `dpokit pipeline` runs rounds of online DPO"
            )
        names, sources = AXOLOTL_LOSSES[rl], ("rl",)
        if rl == "simpo":  # Axolotl runs SimPO in TRL's CPOTrainer, where cpo_alpha (default 1.0) adds the chosen NLL
            note = (
                "TRL's CPOTrainer adds cpo_alpha x the chosen NLL to SimPO: loss.type [simpo, sft] with "
                "loss.weights [1, cpo_alpha] does that"
            )
    if raw.get(type_key) is not None:
        if names in (None, "sigmoid"):
            names, sources = raw[type_key], sources + (type_key,)
        else:
            out.append(Skipped(type_key, raw[type_key], f"Axolotl reads it with rl: dpo only, not rl: {rl}"))
    weights, weight_sources = raw.get(weights_key), (weights_key,)
    if raw.get("rpo_alpha") is not None:
        # RPO (Pang et al. 2024, arXiv 2404.19733): DPO + rpo_alpha x the chosen's token-mean NLL = [sigmoid, sft]
        listed = names if isinstance(names, list) else [names or "sigmoid"]
        if weights is not None and not isinstance(weights, list):
            raise ConfigError(f"{weights_key}: {excerpt(weights)} is not a list of weights")
        weights = (weights or [1.0] * len(listed)) + [as_float("rpo_alpha", raw["rpo_alpha"])]
        names, sources = listed + ["sft"], sources + ("rpo_alpha",)
        weight_sources = (weights_key, "rpo_alpha") if weights_key in raw else ("rpo_alpha",)
    if names is not None:
        out.append(Setting("loss.type", names, sources, note))
    if weights is not None:
        out.append(Setting("loss.weights", weights, weight_sources))
    return out + beta_settings(raw, kind, rl)


def beta_settings(raw: dict, kind: str, rl: Any) -> list:
    """Axolotl reads trl.beta, then rl_beta, then dpo_beta (deprecated), then orpo_alpha (TRL's ORPO beta is lambda)."""
    out: list = []
    trl = raw.get("trl") if isinstance(raw.get("trl"), dict) else {}
    for sub, value in trl.items():
        if sub != "beta":
            out.append(Skipped(f"trl.{sub}", value, "GRPO and online settings; dpokit trains offline"))
    candidates = (
        [
            ("trl.beta", trl.get("beta")),
            ("rl_beta", raw.get("rl_beta")),
            ("dpo_beta", raw.get("dpo_beta")),
            ("orpo_alpha", raw.get("orpo_alpha")),
        ]
        if kind == AXOLOTL
        else [("beta", raw.get("beta"))]
    )
    if "trl" in raw and not isinstance(raw["trl"], dict):
        out.append(Skipped("trl", raw["trl"], "expected a mapping"))
    winner = None
    for key, value in candidates:
        if value is None:
            continue
        if key == "orpo_alpha" and rl != "orpo":
            out.append(Skipped(key, value, f"ORPO's lambda, and rl is {excerpt(rl)}"))
        elif winner is None:
            winner = key
            out.append(
                Setting("loss.beta", as_float(key, value), (key,), "ORPO's lambda" if key == "orpo_alpha" else "")
            )
        else:
            out.append(Skipped(key, value, f"{winner} gives the beta (Axolotl reads it first)"))
    return out
