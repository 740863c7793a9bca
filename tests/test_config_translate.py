"""Configs users bring (issue 20): `dpokit config --from` translates an Axolotl DPO YAML or TRL DPOConfig arguments,
and `dpokit train` given one names that command instead of failing on its first key."""

from __future__ import annotations

import json
import math
import re

import pytest
import yaml
from tiny_assets import synthetic_pairs, tiny_model_dir, write_jsonl

import dpokit
from dpokit.cli import main
from dpokit.config import ConfigError, load_config
from dpokit.config.loading import read_config_mapping
from dpokit.config.translate import AXOLOTL, TRL, flatten, translate
from dpokit.training.metrics import read_metrics

# The seed guide's "Configuration Example", verbatim.
SEED_AXOLOTL = """\
base_model: meta-llama/Llama-2-7b-chat-hf
model_type: LlamaForCausalLM
tokenizer_type: LlamaTokenizer
load_in_8bit: false
load_in_4bit: true        # QLoRA for memory efficiency
adapter: lora
lora_r: 16
lora_alpha: 32
lora_dropout: 0.05
lora_target_modules:
  - q_proj
  - k_proj
  - v_proj
  - o_proj
rl: dpo
dpo_beta: 0.1             # KL penalty coefficient
datasets:
  - path: argilla/ultrafeedback-binarized-preferences
    type: chatml.intel
    split: train
sequence_len: 2048
val_set_size: 0.02
gradient_accumulation_steps: 8
micro_batch_size: 2
num_epochs: 1
learning_rate: 5e-7
lr_scheduler: cosine
warmup_ratio: 0.1
optimizer: adamw_torch
weight_decay: 0.0
bf16: true
tf32: true
gradient_checkpointing: true
save_strategy: steps
save_steps: 500
evaluation_strategy: steps
eval_steps: 100
wandb_project: dpo-alignment
wandb_run_id: llama2-7b-dpo-v1
"""

TRL_ARGS = {
    "output_dir": "runs/trl",
    "model_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct",
    "beta": 0.05,
    "loss_type": "sigmoid",
    "rpo_alpha": 0.5,
    "num_train_epochs": 2,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "learning_rate": 5e-6,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.1,
    "bf16": True,
    "logging_steps": 5,
    "save_strategy": "steps",
    "save_steps": 100,
    "max_length": 1024,
    "max_prompt_length": 256,
    "label_smoothing": 0.1,
    "gradient_checkpointing": True,
    "precompute_ref_log_probs": True,
    "use_peft": True,
    "lora_r": 8,
    "load_in_4bit": True,
    "report_to": "none",
    "dataloader_num_workers": 2,
}


@pytest.fixture()
def seed_file(tmp_path):
    path = tmp_path / "axolotl_dpo.yaml"
    path.write_text(SEED_AXOLOTL)
    return path


def _translated_file(source, tmp_path, capsys) -> tuple[str, object]:
    assert main(["config", "--from", str(source)]) == 0
    text = capsys.readouterr().out
    out = tmp_path / "dpokit.yaml"
    out.write_text(text)
    return text, out


def test_every_key_of_the_seed_example_is_translated_or_listed_with_why(seed_file):
    raw = read_config_mapping(seed_file)
    t = translate(raw, str(seed_file))
    assert t.kind == AXOLOTL
    every = set(raw) | {k for k in flatten(raw) if k.startswith("datasets[0].")}
    assert every - t.accounted() == set()  # no key lost
    cfg = t.nested()
    assert cfg["model"] == {"name_or_path": "meta-llama/Llama-2-7b-chat-hf", "quantization": "nf4", "dtype": "bfloat16"}
    assert cfg["lora"] == {
        "enabled": True,
        "r": 16,
        "alpha": 32,
        "dropout": 0.05,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    }
    assert cfg["data"] == {
        "path": "argilla/ultrafeedback-binarized-preferences",
        "columns": {"prompt": "question"},
        "split": "train",
        "max_length": 2048,
        "eval_fraction": 0.02,
    }
    assert cfg["loss"] == {"type": "sigmoid", "beta": 0.1}
    assert cfg["optim"] == {
        "lr": 5e-7,
        "scheduler": "cosine",
        "warmup_ratio": 0.1,
        "name": "adamw",
        "fused": False,
        "weight_decay": 0.0,
    }
    assert cfg["train"] == {
        "grad_accum": 8,
        "batch_size": 2,
        "epochs": 1,
        "mixed_precision": "bf16",
        "gradient_checkpointing": True,
        "save_steps": 500,
        "eval_steps": 100,
        "report_to": ["wandb"],
    }
    skipped = {s.key for s in t.skipped}
    assert skipped == {
        "model_type",
        "tokenizer_type",
        "load_in_8bit",
        "tf32",
        "save_strategy",
        "evaluation_strategy",
        "wandb_run_id",
    }
    text = t.to_yaml()
    block = text[text.index("# not translated:") :]
    for key in skipped:  # each with its value and a reason
        assert (
            f"#   {key}: {yaml.safe_dump(raw[key], default_flow_style=True).strip().removesuffix('...').strip()}  -- "
            in block
        )


def test_the_translation_round_trips_through_dpokit_config(seed_file, tmp_path, capsys):
    text, out = _translated_file(seed_file, tmp_path, capsys)
    assert "columns: {prompt: question}  # datasets[0].type: chatml.intel" in text
    assert "chatml markers" in text and "a system column" in text  # the layout's differences are said, not hidden
    cfg = load_config(str(out))
    assert cfg == load_config(translate(read_config_mapping(seed_file), "x").nested())
    assert (cfg.model.quantization, cfg.lora.enabled, cfg.data.columns, cfg.optim.lr) == (
        "nf4",
        True,
        {"prompt": "question"},
        5e-7,
    )
    assert main(["config", str(out)]) == 0


def test_train_on_an_axolotl_or_trl_file_names_the_command_that_translates_it(seed_file, tmp_path, capsys):
    with pytest.raises(
        ConfigError,
        match=r"looks like an Axolotl DPO config; translate it with: dpokit config --from \S*axolotl_dpo.yaml > ",
    ):
        load_config(str(seed_file))
    trl = tmp_path / "dpo_config.json"
    trl.write_text(json.dumps(TRL_ARGS))
    assert main(["train", str(trl)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    command = f"dpokit config --from {trl} > dpokit.yaml"
    assert err == [f"dpokit: error: {trl} looks like TRL DPOConfig arguments; translate it with: {command}"]
    typo = tmp_path / "typo.yaml"
    typo.write_text("modle: {name_or_path: x}\n")  # a dpokit config with a typo still gets "did you mean"
    with pytest.raises(ConfigError, match="did you mean 'model'"):
        load_config(str(typo))


def test_trl_arguments_translate_with_rpo_as_sigmoid_plus_sft(tmp_path, capsys):
    path = tmp_path / "dpo_config.json"
    path.write_text(json.dumps(TRL_ARGS))
    t = translate(read_config_mapping(path), str(path))
    assert t.kind == TRL and set(TRL_ARGS) - t.accounted() == set()
    cfg = t.nested()
    assert cfg["loss"] == {"type": ["sigmoid", "sft"], "weights": [1.0, 0.5], "beta": 0.05, "label_smoothing": 0.1}
    assert cfg["model"] == {"name_or_path": "Qwen/Qwen2.5-0.5B-Instruct", "quantization": "nf4"}
    assert cfg["data"] == {"max_length": 1024, "max_prompt_length": 256}
    assert (
        cfg["train"]["mixed_precision"] == "bf16" and cfg["train"]["report_to"] == [] and cfg["out_dir"] == "runs/trl"
    )
    assert {s.key for s in t.skipped} == {"save_strategy", "precompute_ref_log_probs", "dataloader_num_workers"}
    _, out = _translated_file(path, tmp_path, capsys)
    assert load_config(str(out)).loss.weights == [1.0, 0.5]


def test_what_cannot_be_translated_is_one_error_line(tmp_path, capsys):
    cases = {
        "grpo.yaml": ({"base_model": "m", "rl": "grpo"}, "rl: 'grpo' has no dpokit equivalent"),
        "both.yaml": (
            {"base_model": "m", "rl": "dpo", "bf16": True, "fp16": True},
            "give train.mixed_precision two values",
        ),
        "plain.yaml": ({"lr": 1}, "is neither an Axolotl DPO config"),
        # translated, but dpokit refuses a 4-bit base without adapters (as Axolotl does): printed, then said
        "full.yaml": (
            {"base_model": "m", "rl": "dpo", "load_in_4bit": True},
            "above does not load yet: .*set lora.enabled=true",
        ),
    }
    for name, (raw, message) in cases.items():
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw))
        assert main(["config", "--from", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("dpokit: error: ")
        assert re.search(message, err[0]), err[0]


@pytest.mark.slow
def test_the_translated_seed_example_trains_two_qlora_steps_on_a_tiny_model(seed_file, tmp_path, capsys):
    """The seed's YAML, translated, with only the model and the data pointed at local files (and the run kept short)."""
    rows = [
        {"system": "be brief", "question": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
        for r in synthetic_pairs(24, seed=3)
    ]  # chatml.intel's columns
    data = write_jsonl(tmp_path / "intel.jsonl", rows)
    _, out = _translated_file(seed_file, tmp_path, capsys)
    # width 64: bitsandbytes' CPU 4-bit kernel in bfloat16 (the seed's bf16) needs linear widths in multiples of 64
    local = {
        "model.name_or_path": str(tiny_model_dir(hidden_size=64)),
        "data.path": str(data),
        "data.max_length": 64,  # the tiny model's context is 512 tokens; the seed's 2048 is refused against it
        "train.max_steps": 2,
        "train.logging_steps": 1,
        "train.save_steps": 0,
        "train.report_to": [],
        "train.progress_bar": False,
        "speed.ref_cache_dir": str(tmp_path / "cache"),
        "out_dir": str(tmp_path / "run"),
    }
    pytest.importorskip("bitsandbytes")
    cfg = load_config(str(out), local)
    assert (cfg.model.quantization, cfg.lora.enabled, cfg.train.grad_accum, cfg.train.batch_size) == ("nf4", True, 8, 2)
    result = dpokit.train(cfg)
    assert result.stop_reason != "non_finite"
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-2)  # LoRA B starts at 0: the policy is the reference
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["quantization"] == "nf4" and saved["data"]["columns"] == {"prompt": "question"}


def test_empty_keys_extra_datasets_and_losing_betas_are_listed_not_dropped():
    raw = {
        "base_model": "m",
        "rl": "orpo",
        "orpo_alpha": 0.2,
        "trl": {"beta": 0.3, "use_vllm": True},
        "rl_beta": None,
        "adapter": "qlora",
        "datasets": [{"path": "a.jsonl", "type": "chatml.icr", "name": "sub"}, {"path": "b.jsonl"}],
    }
    t = translate(raw, "x.yaml")
    assert set(flatten(raw)) - {"datasets[0]", "datasets[1].path", "trl"} <= t.accounted()
    assert {s.key: s.why for s in t.skipped}.keys() == {
        "trl.use_vllm",
        "orpo_alpha",
        "rl_beta",
        "datasets[0].name",
        "datasets[1]",
    }
    cfg = t.nested()
    assert (cfg["loss"], cfg["data"]["columns"], cfg["model"]["quantization"]) == (
        {"type": "orpo", "beta": 0.3},
        {"prompt": "input"},
        "nf4",
    )
    assert cfg["optim"]["scheduler"] == "cosine" and "optim.scheduler" not in {k for s in t.settings for k in s.sources}
