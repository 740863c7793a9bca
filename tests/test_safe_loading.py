"""Loading never runs code the user did not ask for, and secrets never reach the run directory.

- A model folder whose config.json (or tokenizer_config.json) maps Auto classes to a Python file
  shipped with it is refused with a dpokit message unless model.trust_remote_code=true; the
  file (which would drop a marker file when imported) never runs.
- Pickle-based weights (pytorch_model.bin only) are refused unless model.allow_pickle=true; a
  malicious pickle is never unpickled.
- API keys in the environment are not written to any file of the run (config, metrics,
  checkpoints, final model) nor printed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import dpokit
from dpokit.cli import main as cli_main
from dpokit.config import load_config
from dpokit.model_source import ModelLoadError, check_model_source
from dpokit.models import load_policy, load_tokenizer
from tiny_assets import synthetic_pairs, tiny_model_dir, write_jsonl

EVIL_CODE = """
from pathlib import Path
Path({marker!r}).write_text("the model's own code ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    model_type = "evil"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
"""


def _copy_model(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(tiny_model_dir(), folder)
    return folder


def _cfg(tmp_path: Path, model: Path, **model_keys) -> dict:
    data = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(16, seed=1))
    return {
        "model": {"name_or_path": str(model), **model_keys},
        "data": {"path": str(data), "max_length": 32, "max_prompt_length": 16},
        "train": {"batch_size": 8, "max_steps": 2, "progress_bar": False},
        "out_dir": str(tmp_path / "run"),
    }


@pytest.fixture
def model_with_code(tmp_path):
    folder = _copy_model(tmp_path, "custom-code-model")
    marker = tmp_path / "code-ran.txt"
    (folder / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    )
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


def test_custom_model_code_is_refused_and_never_runs(tmp_path, model_with_code, capsys):
    folder, marker = model_with_code
    cfg = _cfg(tmp_path, folder)
    with pytest.raises(ModelLoadError, match="ships its own Python code") as error:
        dpokit.train(cfg)
    assert "model.trust_remote_code=true" in str(error.value) and "evil.EvilModel" in str(error.value)
    with pytest.raises(ModelLoadError):
        load_policy(load_config(cfg))  # the model loader on its own refuses too
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["train", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert "trust_remote_code" in err and "Traceback" not in err
    assert not marker.exists(), "the model's code ran"
    check_model_source(load_config(cfg, {"model.trust_remote_code": True}))  # opting in passes dpokit's check


def test_custom_tokenizer_code_is_refused(tmp_path):
    folder = _copy_model(tmp_path, "custom-tokenizer")
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["evil_tok.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    with pytest.raises(ModelLoadError, match="tokenizer_config.json has an auto_map"):
        load_tokenizer(load_config(_cfg(tmp_path, folder)))


class _Payload:
    """Unpickling this calls Path.write_text: what a malicious pytorch_model.bin can do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "the pickle ran"))


def test_pickle_only_weights_are_refused_unless_allowed(tmp_path, capsys):
    folder = _copy_model(tmp_path, "pickle-model")
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    cfg = _cfg(tmp_path, folder)
    with pytest.raises(ModelLoadError, match="only pickle-based weights") as error:
        load_policy(load_config(cfg))
    assert "model.allow_pickle=true" in str(error.value) and "pytorch_model.bin" in str(error.value)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["train", str(cfg_path)]) == 2
    assert "allow_pickle" in capsys.readouterr().err

    model = load_policy(load_config(cfg, {"model.allow_pickle": True}))  # allowed: it loads
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], state["model.embed_tokens.weight"])

    marker = tmp_path / "pickle-ran.txt"
    torch.save({"x": _Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError):
        load_policy(load_config(cfg))
    assert not marker.exists()


SECRETS = ["WANDB_API_KEY", "OPENAI_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "ANTHROPIC_API_KEY"]


@pytest.mark.slow
def test_api_keys_never_reach_the_run_directory_or_the_console(tmp_path, monkeypatch, capfd):
    secret = "sk-dpokit-test-9f3c1e7a2b5d4c60"
    for name in SECRETS:
        monkeypatch.setenv(name, f"{secret}-{name}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _cfg(tmp_path, tiny_model_dir())
    cfg["data"]["eval_fraction"] = 0.25
    cfg["train"].update(save_steps=1, max_steps=3, logging_steps=1)
    cfg["lora"] = {"enabled": True, "r": 4, "save": "merged"}
    result = dpokit.train(cfg)
    files = [p for p in Path(result.run_dir).rglob("*") if p.is_file()]
    assert any(p.name == "metrics.jsonl" for p in files) and any(p.name == "trainer_state.json" for p in files)
    for path in files:
        assert secret.encode() not in path.read_bytes(), path
    captured = capfd.readouterr()
    assert secret not in captured.out and secret not in captured.err
