"""A whole run on a tiny model: it learns the preference, and the run directory holds what it promises."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dpokit
from dpokit.cli import main as cli_main
from dpokit.training.metrics import read_metrics
from tiny_assets import synthetic_pairs, tiny_model_dir, write_jsonl

TRL_NAMES = {
    "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "grad_norm", "learning_rate", "epoch",
}  # fmt: skip


def _files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(256, seed=1))
    held_out = write_jsonl(tmp_path / "eval.jsonl", synthetic_pairs(64, seed=2))
    return train, held_out


def _config(tmp_path, train, held_out, **extra):
    cfg = {
        "model": {"name_or_path": str(tiny_model_dir())},
        "data": {"path": str(train), "eval_path": str(held_out), "max_length": 32, "max_prompt_length": 16},
        "loss": {"beta": 0.5},
        "optim": {"lr": 3e-3, "scheduler": "constant"},
        "train": {"batch_size": 16, "max_steps": 30, "logging_steps": 5, "eval_steps": 10, "progress_bar": False},
        "speed": {"ref_cache": False},  # a live reference: kl/chosen is logged (the cached default: test_speed_wiring)
        "out_dir": str(tmp_path / "run"),
    }
    for key, value in extra.items():
        section, name = key.split(".")
        cfg.setdefault(section, {})[name] = value
    return cfg


@pytest.mark.slow
def test_tiny_model_learns_the_preference_and_the_run_directory_is_complete(tmp_path):
    train, held_out = _files(tmp_path)
    result = dpokit.train(_config(tmp_path, train, held_out))

    records = read_metrics(result.run_dir / "metrics.jsonl")
    train_logs = [r for r in records if "loss" in r]
    eval_logs = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train_logs] == [5, 10, 15, 20, 25, 30]
    assert [r["step"] for r in eval_logs] == [10, 20, 30]
    assert TRL_NAMES | {"kl/chosen", "step"} <= set(train_logs[0])
    # learned: held-out accuracy well above chance, loss below log 2, margins and KL grew
    assert eval_logs[-1]["eval_rewards/accuracies"] >= 0.9
    assert eval_logs[-1]["eval_loss"] < 0.5
    assert train_logs[-1]["rewards/margins"] > train_logs[0]["rewards/margins"] > 0
    assert train_logs[-1]["kl/chosen"] > 0
    assert result.metrics["eval_rewards/accuracies"] == eval_logs[-1]["eval_rewards/accuracies"]

    # the resolved config, the data summary and an HF model that from_pretrained loads
    saved = (result.run_dir / "config.yaml").read_text()
    assert "beta: 0.5" in saved
    summary = json.loads((result.run_dir / "data_summary.json").read_text())
    assert summary["train"]["rows_read"] == 256 and summary["train"]["pairs"] == 256
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(result.model_dir)
    ids = tokenizer("the film was good", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.slow
def test_lora_run_saves_an_adapter_and_a_merged_model(tmp_path):
    from peft import AutoPeftModelForCausalLM

    train, held_out = _files(tmp_path)
    for save in ("adapter", "merged"):
        cfg = _config(
            tmp_path, train, held_out, **{"train.max_steps": 4, "lora.enabled": True, "lora.save": save, "lora.r": 4}
        )
        cfg["out_dir"] = str(tmp_path / f"run-{save}")
        result = dpokit.train(cfg)
        files = {p.name for p in result.model_dir.iterdir()}
        if save == "adapter":
            assert "adapter_config.json" in files
            AutoPeftModelForCausalLM.from_pretrained(result.model_dir)
        else:
            assert "adapter_config.json" not in files and "model.safetensors" in files
            AutoModelForCausalLM.from_pretrained(result.model_dir)


def test_cli_reports_a_bad_key_without_a_traceback(tmp_path, capsys):
    train, held_out = _files(tmp_path)
    cfg_path = tmp_path / "run.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(_config(tmp_path, train, held_out)))
    assert cli_main(["train", str(cfg_path), "loss.bta=0.2"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'loss.beta'" in err and "Traceback" not in err


def test_cli_reports_bad_data_with_file_and_row(tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "the film", "chosen": " good", "rejected": " bad"}\n{"prompt": "it was", "chosen": \n')
    import yaml

    cfg_path = tmp_path / "run.yaml"
    cfg = _config(tmp_path, train, train)
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["train", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert "train.jsonl" in err and "2" in err and "Traceback" not in err
