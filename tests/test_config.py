from pathlib import Path

import pytest

from dpokit.config import Config, ConfigError, load_config


def test_defaults_then_yaml_then_command_line(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("loss:\n  beta: 0.2\ntrain:\n  max_steps: 50\n  batch_size: 4\nout_dir: runs/a\n")
    cfg = load_config(yaml_file, ["loss.beta=0.05", "out_dir=runs/b"])
    assert cfg.loss.beta == 0.05  # command line beats YAML
    assert cfg.train.max_steps == 50  # YAML beats default
    assert cfg.train.batch_size == 4
    assert cfg.train.grad_accum == 1  # default kept
    assert cfg.out_dir == "runs/b"


def test_command_line_values_are_typed():
    cfg = load_config(None, ["lora.enabled=true", "optim.lr=5e-7", "loss.beta=1", "data.columns.prompt=question"])
    assert cfg.lora.enabled is True
    assert cfg.optim.lr == pytest.approx(5e-7)
    assert isinstance(cfg.loss.beta, float) and cfg.loss.beta == 1.0
    assert cfg.data.columns == {"prompt": "question"}


@pytest.mark.parametrize(
    "override, message",
    [
        (["loss.bta=0.1"], "did you mean 'loss.beta'"),
        (["optim.learning_rate=1e-6"], "unknown config key 'optim.learning_rate'"),
        (["train.max_steps=ten"], "'train.max_steps' must be int"),
        (["lora.enabled=3"], "'lora.enabled' must be bool"),
        (["train.batch_size=2.5"], "'train.batch_size' must be int"),
        (["loss.type=sigmod"], "valid: "),
        (["optim.scheduler=cosin"], "did you mean 'cosine'"),
        (["data.max_prompt_length=4096"], "must be smaller than data.max_length"),
        (["train=3"], "is a section"),
        (["loss.beta"], "key=value"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(None, override)


def test_unknown_yaml_key_suggests_closest(tmp_path):
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("trian:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        load_config(yaml_file)
    yaml_file.write_text("train:\n  max_step: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'train.max_steps'"):
        load_config(yaml_file)


def test_missing_and_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, {"loss.beta": 0.3, "model.name_or_path": "some/model", "lora.target_modules": ["q_proj"]})
    cfg.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert isinstance(again, Config)


def test_every_shipped_config_loads():
    shipped = sorted((Path(__file__).resolve().parents[1] / "src" / "dpokit" / "configs").glob("*.yaml"))
    assert shipped, "the package ships at least the demo config"
    for path in shipped:
        load_config(path)


# Names users bring from TRL's DPOConfig and HF's TrainingArguments, at the top level or under any section.
TRL_AND_HF_NAMES = [
    ("optim.learning_rate", "optim.lr"),
    ("learning_rate", "optim.lr"),
    ("train.learning_rate", "optim.lr"),
    ("per_device_train_batch_size", "train.batch_size"),
    ("train.gradient_accumulation_steps", "train.grad_accum"),
    ("num_train_epochs", "train.epochs"),
    ("max_prompt_length", "data.max_prompt_length"),
    ("warmup_ratio", "optim.warmup_ratio"),
    ("train.warmup_ratio", "optim.warmup_ratio"),
    ("beta", "loss.beta"),
    ("train.beta", "loss.beta"),
    ("max_length", "data.max_length"),
    ("max_steps", "train.max_steps"),
    ("output_dir", "out_dir"),
    ("train.output_dir", "out_dir"),
    ("lr_scheduler_type", "optim.scheduler"),
    ("weight_decay", "optim.weight_decay"),
    ("gradient_checkpointing", "train.gradient_checkpointing"),
    ("seed", "train.seed"),
    ("logging_steps", "train.logging_steps"),
    ("save_steps", "train.save_steps"),
    ("train.lr", "optim.lr"),  # a dpokit key in the wrong section finds its own
]


@pytest.mark.parametrize("given, expected", TRL_AND_HF_NAMES)
def test_trl_and_hf_names_point_to_dpokit_keys_on_the_command_line_and_in_yaml(given, expected):
    with pytest.raises(ConfigError, match=f"unknown config key '{given}'; did you mean '{expected}'"):
        load_config(None, [f"{given}=1"])
    nested: dict = {}
    node = nested
    *sections, leaf = given.split(".")
    for section in sections:
        node = node.setdefault(section, {})
    node[leaf] = 1
    with pytest.raises(ConfigError, match=f"unknown config key '{given}'; did you mean '{expected}'"):
        load_config(nested)


def test_a_pipelines_train_config_gets_the_same_suggestions_under_its_prefix():
    from dpokit.config import load_pipeline_config

    base = {"policy": "m", "prompts": ["a"], "scorer": "dpokit.demo.world:sentiment"}
    with pytest.raises(ConfigError, match="did you mean 'train.optim.lr'"):
        load_pipeline_config({**base, "train": {"optim": {"learning_rate": 1e-5}}})
    with pytest.raises(ConfigError, match="did you mean 'train.loss.beta'"):
        load_pipeline_config({**base, "train": {"beta": 0.1}})


def test_every_mapped_name_is_a_key_of_the_config():
    from dpokit.config.names import TRL_NAMES

    keys = set(load_config().to_dict()) | {
        f"{s}.{k}" for s, v in load_config().to_dict().items() if isinstance(v, dict) for k in v
    }
    assert TRL_NAMES and not {target for target in TRL_NAMES.values() if target not in keys}
