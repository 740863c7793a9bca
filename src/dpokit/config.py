"""One typed config holds every default; YAML overrides it; `key=value` overrides the YAML.

    cfg = load_config("my.yaml", ["loss.beta=0.05", "train.max_steps=200"])

Unknown keys and wrong types are errors that name the key and suggest the
closest valid one. Values given on the command line are parsed as YAML
scalars, so `train.max_steps=200` is an int and `lora.enabled=true` a bool.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from importlib import resources

from dpokit.losses import LossConfig, validate_loss_config


class ConfigError(ValueError):
    """A user-facing configuration problem; the message names the key."""


@dataclass
class ModelConfig:
    name_or_path: str = ""  # local HF folder or hub id
    ref_name_or_path: Optional[str] = None  # reference model; None: a frozen copy of the policy as loaded (LoRA: adapters off)
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto (the checkpoint's own)
    trust_remote_code: bool = False  # custom modelling code runs only if you say so
    allow_pickle: bool = False  # load pickle-based weights (pytorch_model.bin) when no safetensors exist
    revision: Optional[str] = None
    attn_implementation: Optional[str] = None  # e.g. sdpa, eager, flash_attention_2
    ref_dtype: Optional[str] = None  # live reference in this dtype (float32 | bfloat16 | float16); None: model.dtype
    quantization: str = "none"  # none | nf4 (QLoRA: 4-bit NF4 base via bitsandbytes, needs lora.enabled)


@dataclass
class LoraConfig:
    enabled: bool = False  # the reference is then the same model with adapters disabled
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Union[str, list[str]] = "all-linear"
    save: str = "adapter"  # adapter (PEFT folder) | merged (plain HF model)


@dataclass
class DataConfig:
    path: str = ""  # jsonl/json/parquet/csv (.gz), a save_to_disk folder, or a hub id
    split: str = "train"
    layout: str = "auto"  # auto | prompt_chosen_rejected | implicit_prompt | sharegpt | openai | alpaca | stack_exchange
    columns: dict[str, str] = field(default_factory=dict)  # e.g. {prompt: question, chosen: good, rejected: bad}
    eval_path: Optional[str] = None  # held-out pairs; if unset, eval_fraction of the training rows is held out
    eval_split: str = "test"  # split of eval_path when it is a dataset with splits
    eval_fraction: float = 0.0
    max_length: int = 1024  # prompt + completion tokens; the completion is cut from the right to fit
    max_prompt_length: int = 512  # prompt tokens; the prompt is cut from the left so the latest turns survive
    max_rows: Optional[int] = None  # use only the first N rows (for quick trials)
    strict: bool = False  # stop at the first bad row instead of skipping and reporting it


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adamw_8bit (bitsandbytes: 8-bit moments, ~1/4 of AdamW's state memory)
    lr: float = 1e-6  # TRL's DPO default; LoRA usually wants ~5e-6 or more
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping (the norm is still logged)
    scheduler: str = "linear"  # linear | cosine | constant
    warmup_ratio: float = 0.0
    warmup_steps: int = 0  # takes precedence over warmup_ratio when > 0


@dataclass
class TrainConfig:
    task: str = "preference"  # preference (the DPO family, KTO; by loss.type) | sft (completion-only NLL: dpokit sft)
    batch_size: int = 8  # pairs per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    epochs: float = 1.0
    max_steps: int = -1  # optimizer steps; -1 = derived from epochs
    seed: int = 42
    logging_steps: int = 10
    eval_steps: int = 0  # 0 = evaluate only at the end (when there is eval data)
    eval_batch_size: int = 0  # 0 = batch_size
    mixed_precision: str = "no"  # no | bf16 | fp16 (Accelerate autocast)
    gradient_checkpointing: bool = True  # as TRL: recompute activations in backward (~1/3 more compute, far less memory)
    progress_bar: bool = True
    report_to: list[str] = field(default_factory=list)  # tensorboard | wandb | mlflow, through Accelerate's trackers
    eval_generate: int = 0  # completions sampled at each evaluation to log eval_mean_length; 0 = off
    save_steps: int = 500  # checkpoint every N optimizer steps, and at the end; 0 = no checkpoints
    save_total_limit: int = 2  # keep the last K checkpoints; 0 = keep all
    resume: str = "auto"  # auto (latest complete checkpoint in out_dir) | never | path of a checkpoint folder
    max_skipped_steps: int = 5  # optimizer steps skipped on a NaN/Inf loss or gradient before the run stops


@dataclass
class SpeedConfig:
    """The paired (DPO-family) step's fast paths; each gives the plain path's numbers (docs/performance.md)."""

    packing: bool = True  # several pairs per row, no padding between them
    prefix_sharing: bool = True  # the prompt computed once for chosen and rejected
    chunked_logps: bool = True  # LM head + log-softmax over chunks of completion tokens, recomputed in backward
    logps_chunk_size: int = 0  # tokens per LM-head chunk; 0 = auto (about 4M logits per chunk)
    pack_length: int = 0  # tokens per packed row; 0 = auto (sdpa: the whole micro-batch in one row)
    ref_cache: bool = True  # reference log-probs computed once, stored on disk, reused; no reference in memory
    ref_cache_dir: str = ""  # "" = $DPOKIT_CACHE/ref_logps, else ~/.cache/dpokit/ref_logps

    @property
    def any_fast_path(self) -> bool:
        return self.packing or self.prefix_sharing or self.chunked_logps or self.ref_cache


@dataclass
class DetectorsConfig:
    """Where the live failure detectors fire (training/detectors.py, docs/diagnosis.md); letters name the failure mode."""

    chosen_logp_drop: float = 10.0  # (a) logps/chosen falls by more than this many nats per sequence...
    chosen_logp_drop_fraction: float = 0.1  # (a) ...and more than this share of its start (long completions are noisier)...
    margin_rise: float = 0.1  # (a) ...while rewards/margins rise by more than this
    smoothing: int = 3  # (a) records averaged at the start and at the end, to ride out batch noise
    length_growth: float = 1.5  # (b) mean length above this multiple of its first value
    length_shrink: float = 0.67  # (b) mean length below this multiple of its first value
    kl_warn: float = 5.0  # (c) nats per sequence: the guide's "5-10 nats" range
    kl_high: float = 10.0
    margin_window: int = 5  # (c) last K records in which margins must keep growing
    plateau_ratio: float = 0.5  # (c) growth in the second half of the window vs the first half: >= this = no plateau
    accuracy_after: int = 20  # (d) records before accuracy near 0.5 counts as stuck
    accuracy_band: float = 0.05  # (d) |mean accuracy - 0.5| <= this, over the last `smoothing` records
    oscillation_window: int = 20  # (d) last losses examined for oscillation
    oscillation_sign_share: float = 0.6  # (d) share of consecutive loss differences that change sign (smooth: ~0)
    oscillation_amplitude: float = 0.1  # (d) mean |loss difference| in nats
    eval_rise_count: int = 2  # (e) consecutive rising eval losses that warn
    early_stop_patience: Optional[int] = None  # (e) consecutive rises tolerated; more stops the run (None: never)


@dataclass
class DoctorConfig:
    """Where each `dpokit doctor` check turns from ok to warn (or fail); documented in docs/diagnosis.md."""

    # Dropped rows: any dropped row warns (it is data you thought you had); more than this share fails.
    dropped_fail_share: float = 0.5
    # Length bias: DPO's summed log-probs reward length, so a systematic length gap is a shortcut to learn.
    length_share_longer: float = 0.65  # chosen longer (or shorter) than rejected in more than this share of pairs
    length_mean_ratio: float = 1.3  # mean chosen/rejected length ratio above this (or below its inverse)
    # Truncation at data.max_length / data.max_prompt_length: a cut completion loses its EOS.
    truncation_warn_share: float = 0.05
    truncation_fail_share: float = 0.5
    # Reference log-probs, length-normalised (nats per completion token).
    min_token_logp: float = -4.0  # below: the data is far from what the reference would write
    wrong_way_margin: float = 0.5  # logp(rejected) - logp(chosen) per token above this = "strongly prefers rejected"
    wrong_way_share: float = 0.2  # more than this share of such pairs hints at label noise


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    detectors: DetectorsConfig = field(default_factory=DetectorsConfig)
    doctor: DoctorConfig = field(default_factory=DoctorConfig)
    out_dir: str = "runs/dpo"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def shipped_config(name: str, folder: str = "") -> Path | None:
    """A config shipped with dpokit: configs/[folder/]NAME.yaml (e.g. `demo`, or `pipeline_demo` in pipelines)."""
    candidate = resources.files("dpokit").joinpath("configs", *([folder] if folder else []), f"{name}.yaml")
    return Path(str(candidate)) if candidate.is_file() else None


def resolve_config_path(arg: str, folder: str = "") -> str:
    """A YAML path as given, or the path of the shipped config of that name."""
    if Path(arg).exists() or arg.endswith((".yaml", ".yml")):
        return arg
    shipped = shipped_config(arg, folder)
    return str(shipped) if shipped else arg


# Top-level keys that hold a section of settings (dict-valued settings such as data.columns are plain values).
SECTIONS = ("model", "lora", "data", "loss", "optim", "train", "speed", "detectors", "doctor")


def load_config(source: Union[str, Path, dict, Config, None] = None, overrides: Union[list[str], dict, None] = None) -> Config:
    """Build a Config from defaults, then a YAML file / dict / Config, then overrides.

    overrides: ["a.b=value", ...] (command line) or {"a.b": value} (Python).
    """
    if isinstance(source, Config):
        raw = source.to_dict()
    elif isinstance(source, dict):
        raw = source
    elif source is None:
        raw = {}
    elif isinstance(source, (str, Path)):
        raw = _read_yaml(Path(source))
    else:
        raise ConfigError(f"a config is a YAML path, a dict or a Config, got {type(source).__name__}")
    merged = Config().to_dict()
    _merge(merged, raw, prefix="")
    for key, value in _parse_overrides(overrides):
        _set_dotted(merged, key, value)
    cfg = _build(Config, merged, prefix="")
    _validate(cfg)
    return cfg


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, RecursionError, ValueError) as e:  # a folder, no permission, absurd nesting
        raise ConfigError(f"{path}: cannot read the config file: {type(e).__name__}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _parse_overrides(overrides) -> list[tuple[str, Any]]:
    if overrides is None:
        return []
    if isinstance(overrides, dict):
        for key in overrides:
            if not isinstance(key, str):
                raise ConfigError(f"override keys are dotted names such as 'loss.beta', got {key!r}")
        return list(overrides.items())
    if isinstance(overrides, str):
        raise ConfigError(f"overrides are a list of key=value strings, got the single string {overrides!r}")
    out = []
    for item in overrides:
        if not isinstance(item, str):
            raise ConfigError(f"override {item!r} is not a key=value string (e.g. loss.beta=0.05)")
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. loss.beta=0.05)")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except (yaml.YAMLError, ValueError, RecursionError):
            value = text
        out.append((key.strip(), value))
    return out


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"


def _merge(base: dict, update: dict, prefix: str) -> None:
    for key, value in update.items():
        if not isinstance(key, str):
            raise ConfigError(f"config keys are names, got {key!r} ({type(key).__name__}) in {prefix.rstrip('.') or 'the top level'}")
        full = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key {full!r}" + _suggest(full, [f"{prefix}{k}" for k in base]))
        if prefix == "" and key in SECTIONS and isinstance(value, dict):
            _merge(base[key], value, prefix=f"{full}.")
        else:
            base[key] = value


def _set_dotted(merged: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if key in SECTIONS:
        raise ConfigError(f"config key {key!r} is a section; set one of its keys, e.g. {_all_keys({key: merged[key]})[0]}=...")
    valid = _all_keys(merged)
    if key not in valid:
        # data.columns.prompt=question sets one entry of a dict-valued setting
        head, _, last = key.rpartition(".")
        if head in valid and isinstance(_get_dotted(merged, head), dict):
            _get_dotted(merged, head)[last] = value
            return
        raise ConfigError(f"unknown config key {key!r}" + _suggest(key, valid))
    node = merged
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value


def _get_dotted(merged: dict, key: str):
    node = merged
    for part in key.split("."):
        node = node[part]
    return node


def _all_keys(merged: dict) -> list[str]:
    keys = []
    for k, v in merged.items():
        if k in SECTIONS:
            keys += [f"{k}.{sub}" for sub in v]
        else:
            keys.append(k)
    return keys


def _build(cls, raw: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        value = raw[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {key!r} must be a mapping of {f.name} settings, got {value!r}")
            kwargs[f.name] = _build(hints[f.name], value, prefix=f"{key}.")
        else:
            kwargs[f.name] = _coerce(value, hints[f.name], key)
    return cls(**kwargs)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp, key: str):
    """Check `value` against the annotation `tp`; allow only lossless conversions (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key {key!r} must be {' or '.join(_type_name(a) for a in typing.get_args(tp))}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"config key {key!r}: expected null, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        return {str(k): _coerce(v, typing.get_args(tp)[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int too large for a float
                number = math.inf
        elif isinstance(value, str):  # YAML 1.1 reads "5e-7" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"config key {key!r} must be a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise ConfigError(f"config key {key!r} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"config key {key!r} must be one of {', '.join(choices)}; got {value!r}" + _suggest(value, list(choices)).replace("valid keys", "valid values"))


def _validate(cfg: Config) -> None:
    _check_choice("model.dtype", cfg.model.dtype, ("float32", "bfloat16", "float16", "auto"))
    _check_choice("lora.save", cfg.lora.save, ("adapter", "merged"))
    if cfg.model.ref_dtype is not None:
        _check_choice("model.ref_dtype", cfg.model.ref_dtype, ("float32", "bfloat16", "float16"))
    if cfg.model.ref_dtype is not None and cfg.lora.enabled:
        raise ConfigError("model.ref_dtype cannot be combined with lora.enabled: with LoRA the reference is the policy's "
                          "own base with its adapters disabled, there is no copy to cast")
    _check_choice("model.quantization", cfg.model.quantization, ("none", "nf4"))
    if cfg.model.quantization != "none" and not cfg.lora.enabled:
        raise ConfigError("model.quantization=nf4 trains LoRA adapters on a frozen 4-bit base (QLoRA): set lora.enabled=true")
    _check_choice("optim.name", cfg.optim.name, ("adamw", "adamw_8bit"))
    _check_choice("optim.scheduler", cfg.optim.scheduler, ("linear", "cosine", "constant"))
    _check_choice("train.mixed_precision", cfg.train.mixed_precision, ("no", "bf16", "fp16"))
    _check_choice("train.task", cfg.train.task, ("preference", "sft"))
    if cfg.model.ref_name_or_path and cfg.lora.enabled:
        raise ConfigError("model.ref_name_or_path cannot be combined with lora.enabled: with LoRA the reference is the "
                          "policy's base model with its adapters disabled")
    try:
        validate_loss_config(cfg.loss)
    except ValueError as e:
        raise ConfigError(f"config key 'loss.type': {e}" if "unknown loss.type" in str(e) else str(e)) from None
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
    if cfg.data.max_prompt_length >= cfg.data.max_length:
        raise ConfigError(
            f"data.max_prompt_length ({cfg.data.max_prompt_length}) must be smaller than data.max_length "
            f"({cfg.data.max_length}), or no completion token would fit"
        )
    if not 0.0 <= cfg.data.eval_fraction < 1.0:
        raise ConfigError(f"config key 'data.eval_fraction' must be in [0, 1), got {cfg.data.eval_fraction}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"config key 'optim.lr' must be > 0, got {cfg.optim.lr}")
    if cfg.train.max_steps == 0 or cfg.train.max_steps < -1:
        raise ConfigError(f"config key 'train.max_steps' must be -1 (use train.epochs) or > 0, got {cfg.train.max_steps}")
    if cfg.train.epochs <= 0:
        raise ConfigError(f"config key 'train.epochs' must be > 0, got {cfg.train.epochs}")
    at_least_zero = {
        "train.eval_steps": cfg.train.eval_steps,
        "train.eval_batch_size": cfg.train.eval_batch_size,
        "train.save_steps": cfg.train.save_steps,
        "train.save_total_limit": cfg.train.save_total_limit,
        "train.max_skipped_steps": cfg.train.max_skipped_steps,
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
    if not 0.0 <= cfg.optim.warmup_ratio <= 1.0:
        raise ConfigError(f"config key 'optim.warmup_ratio' must be in [0, 1], got {cfg.optim.warmup_ratio}")
    for key, value in (("optim.adam_beta1", cfg.optim.adam_beta1), ("optim.adam_beta2", cfg.optim.adam_beta2)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"config key {key!r} must be in [0, 1), got {value}")
    if cfg.optim.adam_eps <= 0:
        raise ConfigError(f"config key 'optim.adam_eps' must be > 0, got {cfg.optim.adam_eps}")
    if cfg.lora.r <= 0 or cfg.lora.alpha <= 0:
        raise ConfigError(f"config keys 'lora.r' and 'lora.alpha' must be > 0, got r={cfg.lora.r}, alpha={cfg.lora.alpha}")
    if cfg.lora.dropout >= 1.0:
        raise ConfigError(f"config key 'lora.dropout' must be in [0, 1), got {cfg.lora.dropout}")
    if cfg.train.resume.strip() == "":
        raise ConfigError("config key 'train.resume' must be auto, never, or the path of a checkpoint folder; got ''")
