"""One typed config holds every default; YAML overrides it; `key=value` overrides the YAML.

    cfg = load_config("my.yaml", ["loss.beta=0.05", "train.max_steps=200"])

Unknown keys and wrong types are errors that name the key and suggest the
closest valid one. Values given on the command line are parsed as YAML
scalars, so `train.max_steps=200` is an int and `lora.enabled=true` a bool.

The online verbs' settings live here too (SamplingConfig, PairingConfig, EvalConfig,
JudgeConfig), and `dpokit pipeline`'s PipelineConfig is loaded by the same machinery:

    pipe = load_pipeline_config("pipeline.yaml", ["rounds=3", "train.loss.beta=0.2"])

    errors.py    ConfigError and its messages      schema.py    the training sections and Config
    online.py    the online verbs' sections         loading.py   YAML, overrides, strict keys and types
    validate.py  choices, ranges, contradictions
"""

from dpokit.config.errors import ConfigError
from dpokit.config.loading import (
    MAX_CONFIG_BYTES,
    MAX_YAML_NODES,
    PIPELINE_SECTIONS,
    SECTIONS,
    load_config,
    load_pipeline_config,
    load_yaml_text,
    resolve_config_path,
    shipped_config,
)
from dpokit.config.paths import PATH_KEYS, resolve_paths
from dpokit.config.online import (
    JUDGE_MODES,
    LENGTH_BALANCES,
    PAIRING_STRATEGIES,
    SAMPLING_BACKENDS,
    EvalConfig,
    JudgeConfig,
    PairingConfig,
    PipelineConfig,
    SamplingConfig,
)
from dpokit.config.schema import (
    Config,
    DataConfig,
    DetectorsConfig,
    DoctorConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    SpeedConfig,
    TrainConfig,
)
from dpokit.losses import LossConfig

__all__ = [
    "JUDGE_MODES",
    "LENGTH_BALANCES",
    "PATH_KEYS",
    "MAX_CONFIG_BYTES",
    "MAX_YAML_NODES",
    "PAIRING_STRATEGIES",
    "PIPELINE_SECTIONS",
    "SAMPLING_BACKENDS",
    "SECTIONS",
    "Config",
    "ConfigError",
    "DataConfig",
    "DetectorsConfig",
    "DoctorConfig",
    "EvalConfig",
    "JudgeConfig",
    "LoraConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "PairingConfig",
    "PipelineConfig",
    "SamplingConfig",
    "SpeedConfig",
    "TrainConfig",
    "load_config",
    "load_pipeline_config",
    "load_yaml_text",
    "resolve_config_path",
    "resolve_paths",
    "shipped_config",
]
