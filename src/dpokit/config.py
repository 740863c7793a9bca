"""One typed config holds every default; YAML overrides it; `key=value` overrides the YAML.

    cfg = load_config("my.yaml", ["loss.beta=0.05", "train.max_steps=200"])

Unknown keys and wrong types are errors that name the key and suggest the
closest valid one. Values given on the command line are parsed as YAML
scalars, so `train.max_steps=200` is an int and `lora.enabled=true` a bool.

The online verbs' settings live here too (SamplingConfig, PairingConfig, EvalConfig,
JudgeConfig), and `dpokit pipeline`'s PipelineConfig is loaded by the same machinery:

    pipe = load_pipeline_config("pipeline.yaml", ["rounds=3", "train.loss.beta=0.2"])
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from importlib import resources

from dpokit.losses import LOSSES, UNPAIRED_LOSSES, LossConfig, loss_names, validate_loss_config


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
    # prompt tokens; the prompt is cut from the left so the latest turns survive. null (the default) resolves
    # to max_length // 2 when the config is loaded, so every reader sees an int (1024 -> 512, 256 -> 128)
    max_prompt_length: Optional[int] = None
    max_rows: Optional[int] = None  # use only the first N rows (for quick trials)
    strict: bool = False  # stop at the first bad row instead of skipping and reporting it


@dataclass
class OptimConfig:
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
    num_threads: int = 0  # torch CPU threads; 0 = auto (1 for models under 50M parameters on CPU, else torch's default)


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
    attention: str = "auto"  # fast-path attention when model.attn_implementation is unset: auto | sdpa | flex | flash

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
    # Warn when chosen is longer (or shorter) in more than this share of pairs, or the median chosen/rejected
    # ratio passes 1.3 (or 1/1.3); and only when a sign test says the split is not chance (p below 0.05:
    # with 5 pairs or fewer no split can be told from chance, with 100 pairs 60/40 already can).
    length_share_longer: float = 0.65
    length_median_ratio: float = 1.3
    length_sign_test_p: float = 0.05
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


# --- the online verbs: dpokit sample, score, pair, eval, pipeline (docs/pipeline.md) ---------------

SAMPLING_BACKENDS = ("auto", "hf", "vllm")
PAIRING_STRATEGIES = ("best_worst", "all_pairs")
LENGTH_BALANCES = ("none", "closest")
JUDGE_MODES = ("pointwise", "pairwise")


@dataclass
class SamplingConfig:
    """`dpokit sample` and a pipeline's `sampling:` section."""

    num_samples: int = 4  # completions per prompt
    temperature: float = 1.0  # 0 = greedy (then every sample of a prompt is the same)
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0
    batch_size: int = 64  # sequences per generate call; a chunk holds max(1, batch_size // num_samples) prompts
    backend: str = "auto"  # auto (vLLM when installed with a GPU, else hf) | hf | vllm

    def __post_init__(self) -> None:  # built in code (dpokit sample, tests) or by the loader: checked either way
        _check_sampling(self)

    @property
    def prompts_per_chunk(self) -> int:
        return max(1, self.batch_size // self.num_samples)


@dataclass
class PairingConfig:
    """`dpokit pair` and a pipeline's `pairing:` section (online/pairing.py explains each rule)."""

    strategy: str = "best_worst"  # best_worst | all_pairs
    min_margin: float = 0.0  # keep pairs with score(chosen) - score(rejected) >= min_margin (and > 0 always)
    length_balance: str = "none"  # none | closest (best_worst: the passing pair with the smallest length difference)
    max_length_ratio: Optional[float] = None  # drop pairs with longer/shorter token count above this
    max_pairs_per_prompt: Optional[int] = None  # all_pairs: keep the largest-margin pairs only
    drop_unfinished: bool = False  # leave out completions that hit max_new_tokens without EOS

    def __post_init__(self) -> None:
        _check_pairing(self)


@dataclass
class EvalConfig:
    """`dpokit eval` and a pipeline's `eval:` section."""

    num_samples: int = 4
    max_new_tokens: Optional[int] = None  # None: sampling.max_new_tokens
    temperature: float = 1.0  # 1 and top_p 1 keep the KL estimate unbiased
    top_p: float = 1.0
    seed: int = 0
    max_prompts: Optional[int] = None
    pairs: Optional[str] = None  # held-out preference pairs for the implicit-reward accuracy


@dataclass
class JudgeConfig:
    """An LLM judge behind an OpenAI-compatible /v1/chat/completions endpoint (online/judges.py)."""

    base_url: str = ""  # e.g. http://127.0.0.1:8000/v1
    model: str = ""  # the model name sent to the endpoint
    mode: str = "pointwise"  # pointwise (a 1-10 rating) | pairwise (A or B)
    api_key_env: str = "OPENAI_API_KEY"  # environment variable read at each request; never stored
    timeout: float = 60.0  # seconds per HTTP request
    max_retries: int = 4  # retries after the first attempt, with exponential backoff
    backoff: float = 1.0  # seconds before the first retry, doubled each time...
    max_backoff: float = 30.0  # ...up to this
    temperature: float = 0.0
    max_tokens: int = 64
    max_concurrency: int = 4  # requests in flight
    swap: bool = True  # pairwise: ask both orders and average (cancels position bias)


@dataclass
class PipelineConfig:
    """`dpokit pipeline CONFIG`: K rounds of sample -> score -> pair -> DPO -> eval (online/pipeline.py)."""

    policy: str = ""  # the SFT model: folder, hub id, or demo:sentiment-sft
    prompts: Union[str, list[Any]] = ""  # training prompts: a data file, a list, or demo:openings-train
    eval_prompts: Union[str, list[Any], None] = None  # held-out prompts (demo:openings-eval); None: no per-round eval
    scorer: Any = None  # "module:function", "rm:MODEL", or a mapping (see dpokit.online.scoring.build_scorer)
    rounds: int = 2
    reference: str = "fixed"  # fixed: the SFT model every round | refresh: the previous round's policy
    prompts_per_round: Optional[int] = None  # a fresh seeded subset of the prompts each round; None: all
    prompt_column: str = "prompt"
    seed: int = 0
    trust_remote_code: bool = False  # models the pipeline loads (policy, reward model, training) may run their own code
    allow_pickle: bool = False  # ...may have pickle-based weights (pytorch_model.bin) only
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    pairing: PairingConfig = field(default_factory=PairingConfig)
    train: Union[str, dict[str, Any]] = field(default_factory=dict)  # a dpokit train config: mapping, YAML path or shipped name
    eval: EvalConfig = field(default_factory=EvalConfig)
    out_dir: str = "runs/pipeline"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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


def _sections(schema) -> tuple[str, ...]:
    """Top-level keys of a schema that hold a section of settings (dict-valued settings such as data.columns are plain values)."""
    hints = typing.get_type_hints(schema)
    return tuple(f.name for f in dataclasses.fields(schema) if dataclasses.is_dataclass(hints[f.name]))


SECTIONS = _sections(Config)
PIPELINE_SECTIONS = _sections(PipelineConfig)


def load_config(source: Union[str, Path, dict, Config, None] = None, overrides: Union[list[str], dict, None] = None) -> Config:
    """Build a Config from defaults, then a YAML file / dict / Config, then overrides.

    overrides: ["a.b=value", ...] (command line) or {"a.b": value} (Python).
    """
    return _load_train_config(source, overrides, prefix="")


def load_pipeline_config(source: Union[str, Path, dict, PipelineConfig, None],
                         overrides: Union[list[str], dict, None] = None) -> PipelineConfig:
    """A PipelineConfig from defaults, a YAML file / dict, then overrides, by the same rules as load_config.

    `train.loss.beta=0.2` reaches into the `train:` section (a dpokit train config), which is then
    checked as a Config.
    """
    merged = _defaults_and(PipelineConfig, source)
    items = _parse_overrides(overrides)
    if isinstance(merged["train"], str) and any(key.startswith("train.") for key, _ in items):
        # a train config named by path or shipped name: read it, so the overrides have a mapping to go into
        merged["train"] = _read_yaml(Path(resolve_config_path(merged["train"])))
    for key, value in items:
        _set_dotted(merged, key, value, PIPELINE_SECTIONS)
    cfg = _build(PipelineConfig, merged, prefix="")
    _validate_pipeline(cfg)
    return cfg


def _load_train_config(source, overrides, prefix: str) -> Config:
    """load_config's work; prefix names where the config sits ("train." inside a pipeline) in error messages."""
    merged = _defaults_and(Config, source, prefix)
    for key, value in _parse_overrides(overrides):
        _set_dotted(merged, key, value, SECTIONS)
    cfg = _build(Config, merged, prefix=prefix)
    try:
        _validate(cfg)
    except ConfigError as e:
        if not prefix:
            raise
        # _validate names keys from the train config's top; say where that config sits
        raise ConfigError(f"in {prefix.rstrip('.')!r} (a dpokit train config): {e}") from None
    return cfg


def _defaults_and(schema, source, prefix: str = "") -> dict:
    """The schema's defaults as a nested dict, with `source` (an instance, a dict, a YAML path or None) merged in."""
    if isinstance(source, schema):
        raw = dataclasses.asdict(source)
    elif isinstance(source, dict):
        raw = copy.deepcopy(source)  # overrides go into nested mappings; the caller's stay as they were
    elif source is None:
        raw = {}
    elif isinstance(source, (str, Path)):
        raw = _read_yaml(Path(source))
    else:
        raise ConfigError(f"a config is a YAML path, a dict or a {schema.__name__}, got {type(source).__name__}")
    merged = dataclasses.asdict(schema())
    _merge(merged, raw, prefix, _sections(schema))
    return merged


# A config file is a few KB of settings. These limits stop a "billion laughs" file (nested aliases
# that expand exponentially) before it is expanded, printed or copied: 2 KB of anchors can expand
# to gigabytes. Real configs use few aliases, if any, and stay far below both numbers.
MAX_CONFIG_BYTES = 1_000_000
MAX_YAML_NODES = 100_000  # scalars + collections after expanding every alias


def _expanded_size(node: yaml.Node, limit: int) -> int:
    """Nodes in the document once every alias is expanded, counted without expanding it (stops past `limit`).

    Aliases are shared node objects in the composed graph, so each node's expanded size is computed
    once; a node that contains itself (a recursive alias) counts as unlimited.
    """
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(n: yaml.Node) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if id(n) in in_progress:
            return limit + 1
        in_progress.add(id(n))
        total = 1
        if isinstance(n, yaml.SequenceNode):
            children = n.value
        elif isinstance(n, yaml.MappingNode):
            children = [part for pair in n.value for part in pair]
        else:
            children = []
        for child in children:
            total = min(limit + 1, total + size(child))
        in_progress.discard(id(n))
        sizes[id(n)] = total
        return total

    return size(node)


def load_yaml_text(text: str, where: str):
    """yaml.safe_load(text), refused (ConfigError naming `where`) when its aliases expand past MAX_YAML_NODES."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if node is not None and _expanded_size(node, MAX_YAML_NODES) > MAX_YAML_NODES:
        raise ConfigError(f"{where}: the YAML expands to more than {MAX_YAML_NODES} values once its aliases (*name) "
                          "are expanded; a config needs far fewer: write the settings out without nested aliases")
    return yaml.safe_load(text)


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        if path.is_file() and path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size} bytes is too large for a config file (limit {MAX_CONFIG_BYTES})")
        data = load_yaml_text(path.read_text(encoding="utf-8"), str(path))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e)[:300]}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, RecursionError, ValueError) as e:  # a folder, no permission, absurd nesting
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{path}: cannot read the config file: {type(e).__name__}: {str(e)[:300]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


# Error messages quote the offending value; a short excerpt is enough to find it, and a huge value
# (an expanded alias, a pasted file) must not turn one error line into megabytes of output.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple, _REPR.maxset = 3, 6, 6, 6, 6
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 80, 80, 40


def _excerpt(value: Any, limit: int = 120) -> str:
    """repr(value) cut to about `limit` characters, without building the full repr of a large value."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_overrides(overrides) -> list[tuple[str, Any]]:
    if overrides is None:
        return []
    if isinstance(overrides, dict):
        for key in overrides:
            if not isinstance(key, str):
                raise ConfigError(f"override keys are dotted names such as 'loss.beta', got {_excerpt(key)}")
        return list(overrides.items())
    if isinstance(overrides, str):
        raise ConfigError(f"overrides are a list of key=value strings, got the single string {_excerpt(overrides)}")
    out = []
    for item in overrides:
        if not isinstance(item, str):
            raise ConfigError(f"override {_excerpt(item)} is not a key=value string (e.g. loss.beta=0.05)")
        if "=" not in item:
            raise ConfigError(f"override {_excerpt(item)} is not of the form key=value (e.g. loss.beta=0.05)")
        key, text = item.split("=", 1)
        try:
            value = load_yaml_text(text, f"override {key.strip()!r}") if text != "" else ""
        except (yaml.YAMLError, ValueError, RecursionError):
            value = text
        out.append((key.strip(), value))
    return out


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"


def _merge(base: dict, update: dict, prefix: str, sections: tuple[str, ...]) -> None:
    for key, value in update.items():
        if not isinstance(key, str):
            raise ConfigError(f"config keys are names, got {_excerpt(key)} ({type(key).__name__}) in {prefix.rstrip('.') or 'the top level'}")
        full = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key {_excerpt(full)}" + _suggest(full[:200], [f"{prefix}{k}" for k in base]))
        if key in sections and dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)  # a section given as its dataclass (Python callers)
        if key in sections and isinstance(value, dict):
            _merge(base[key], value, f"{full}.", ())
        else:
            base[key] = value


def _set_dotted(merged: dict, key: str, value: Any, sections: tuple[str, ...]) -> None:
    parts = key.split(".")
    if key in sections:
        raise ConfigError(f"config key {key!r} is a section; set one of its keys, e.g. {_all_keys({key: merged[key]}, sections)[0]}=...")
    valid = _all_keys(merged, sections)
    if key not in valid:
        # A key below a mapping-valued setting sets one entry of it: data.columns.prompt=question, or in
        # a pipeline train.loss.beta=0.2 (its train config is a mapping; missing levels are made).
        for n in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:n])
            if head in valid and isinstance(_get_dotted(merged, head), dict):
                node = _get_dotted(merged, head)
                for part in parts[n:-1]:
                    node = node.setdefault(part, {})
                    if not isinstance(node, dict):
                        raise ConfigError(f"config key {_excerpt(key)}: {head}...{part} is a value, not a mapping")
                node[parts[-1]] = value
                return
        raise ConfigError(f"unknown config key {_excerpt(key)}" + _suggest(key[:200], valid))
    node = merged
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value


def _get_dotted(merged: dict, key: str):
    node = merged
    for part in key.split("."):
        node = node[part]
    return node


def _all_keys(merged: dict, sections: tuple[str, ...]) -> list[str]:
    keys = []
    for k, v in merged.items():
        if k in sections:
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
                raise ConfigError(f"config key {key!r} must be a mapping of {f.name} settings, got {_excerpt(value)}")
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
        raise ConfigError(f"config key {key!r} must be {' or '.join(_type_name(a) for a in typing.get_args(tp))}, got {_excerpt(value)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"config key {key!r}: expected null, got {_excerpt(value)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} must be a list, got {_excerpt(value)}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {_excerpt(value)}")
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
                raise ConfigError(f"config key {key!r} must be a finite number, got {_excerpt(value)}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise ConfigError(f"config key {key!r} must be {_type_name(tp)}, got {_excerpt(value)} ({type(value).__name__})")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"config key {key!r} must be one of {', '.join(choices)}; got {_excerpt(value)}" + _suggest(value, list(choices)).replace("valid keys", "valid values"))


def _validate(cfg: Config) -> None:
    """Check every setting; also resolves data.max_prompt_length=null to max_length // 2, so readers get an int."""
    _check_choice("model.dtype", cfg.model.dtype, ("float32", "bfloat16", "float16", "auto"))
    _check_choice("lora.save", cfg.lora.save, ("adapter", "merged"))
    _check_choice("optim.scheduler", cfg.optim.scheduler, ("linear", "cosine", "constant"))
    _check_choice("train.mixed_precision", cfg.train.mixed_precision, ("no", "bf16", "fp16"))
    _check_choice("train.task", cfg.train.task, ("preference", "sft"))
    _check_choice("speed.attention", cfg.speed.attention, ("auto", "sdpa", "flex", "flash"))
    if cfg.model.ref_name_or_path and cfg.lora.enabled:
        raise ConfigError("model.ref_name_or_path cannot be combined with lora.enabled: with LoRA the reference is the "
                          "policy's base model with its adapters disabled")
    valid_losses = sorted(set(LOSSES) | UNPAIRED_LOSSES)
    for name in loss_names(cfg.loss):
        if name not in valid_losses:
            close = difflib.get_close_matches(name[:100], valid_losses, n=1, cutoff=0.5)
            raise ConfigError(f"config key 'loss.type': unknown loss {_excerpt(name)}"
                              + (f"; did you mean {close[0]!r}?" if close else "") + f" valid: {', '.join(valid_losses)}")
    try:
        validate_loss_config(cfg.loss)
    except ValueError as e:
        raise ConfigError(f"config key 'loss.type': {e}" if "unknown loss.type" in str(e) else str(e)) from None
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
    if cfg.data.max_length < 2:
        raise ConfigError(f"config key 'data.max_length' must be >= 2 (one prompt and one completion token), got {cfg.data.max_length}")
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


# --- the online verbs' checks -------------------------------------------------------------------


def _check_sampling(s: SamplingConfig) -> None:
    for key, value in (("num_samples", s.num_samples), ("max_new_tokens", s.max_new_tokens), ("batch_size", s.batch_size)):
        if value < 1:
            raise ConfigError(f"config key 'sampling.{key}' must be >= 1, got {value}")
    if s.temperature < 0:
        raise ConfigError(f"config key 'sampling.temperature' must be >= 0 (0: greedy), got {s.temperature}")
    if not 0 < s.top_p <= 1:
        raise ConfigError(f"config key 'sampling.top_p' must be in (0, 1], got {s.top_p}")
    _check_choice("sampling.backend", s.backend, SAMPLING_BACKENDS)


def _check_pairing(p: PairingConfig) -> None:
    _check_choice("pairing.strategy", p.strategy, PAIRING_STRATEGIES)
    _check_choice("pairing.length_balance", p.length_balance, LENGTH_BALANCES)
    if p.min_margin < 0:
        raise ConfigError(f"config key 'pairing.min_margin' must be >= 0, got {p.min_margin}")
    if p.max_length_ratio is not None and p.max_length_ratio < 1:
        raise ConfigError(f"config key 'pairing.max_length_ratio' must be >= 1 or null, got {p.max_length_ratio}")


def _validate_pipeline(cfg: PipelineConfig) -> None:
    """The sections check themselves as they are built; here the keys that depend on each other, and `train`."""
    if cfg.reference not in ("fixed", "refresh"):
        raise ConfigError(f"config key 'reference' must be fixed or refresh, got {cfg.reference!r}")
    if cfg.rounds < 1:
        raise ConfigError(f"config key 'rounds' must be >= 1, got {cfg.rounds}")
    if not cfg.policy:
        raise ConfigError("config key 'policy' (the SFT model) is required")
    if not cfg.prompts:
        raise ConfigError("config key 'prompts' is required")
    if cfg.scorer is None:
        raise ConfigError("config key 'scorer' is required (e.g. dpokit.demo.world:sentiment)")
    if cfg.prompts_per_round is not None and cfg.prompts_per_round < 1:
        raise ConfigError(f"config key 'prompts_per_round' must be >= 1 or null (all prompts), got {cfg.prompts_per_round}")
    # The train section is a whole dpokit train config: checked now, not at the end of round 1's sampling.
    source = cfg.train if isinstance(cfg.train, dict) else resolve_config_path(cfg.train)
    _load_train_config(source, None, prefix="train.")
