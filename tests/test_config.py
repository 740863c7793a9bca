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
