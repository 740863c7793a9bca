"""`dpokit plan`: predicted peak memory against the measured peak RSS of real CPU training runs.

Two models with a realistic vocabulary (32,000 tokens; 20M and 58M parameters, full fine-tuning in
float32, the default speed.* paths and gradient checkpointing) train 2 steps each in a child
process, which reports its peak resident memory: VmHWM of /proc/self/status on Linux (ru_maxrss
survives exec, so a child forked from this large pytest process would report the parent's size;
ru_maxrss elsewhere). The baseline is
the peak RSS of a child that only imports torch and transformers; the plan's device="cpu"
prediction (no CUDA runtime allowance) must be within 25% of (run - baseline). The three children
run at once.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from dpokit.config import load_config
from dpokit.model_shape import model_shape
from dpokit.plan import format_plan, parse_size, plan_memory, read_model_shape, suggestions
from tiny_assets import WORDS, word_tokenizer, write_jsonl

CHILD = """
import json, resource, sys
if sys.argv[1] == "baseline":
    import torch, transformers  # noqa: F401
else:
    import dpokit
    dpokit.train(json.loads(sys.argv[1]))
status = open("/proc/self/status").read() if sys.platform == "linux" else ""
hwm = [int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")]
print(hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""
SIZES = {"20M": (256, 4, 688), "58M": (512, 8, 1376)}  # hidden, layers, intermediate


def _llama_folder(path, hidden, layers, intermediate):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer()
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _config(tmp_path, name: str) -> dict:
    rng = random.Random(0)
    words = WORDS[:20]
    rows = [
        {
            "prompt": "the film",
            "chosen": " " + " ".join(rng.choices(words, k=200)),
            "rejected": " " + " ".join(rng.choices(words, k=200)),
        }
        for _ in range(4)
    ]  # completions cut at max_length: every pair fills it (the plan's worst case)
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    return {
        "model": {"name_or_path": str(tmp_path / name)},
        "data": {"path": str(data), "max_length": 64, "max_prompt_length": 16},
        "optim": {"lr": 1e-5},
        "speed": {"ref_cache_dir": str(tmp_path / "cache")},
        "train": {"batch_size": 2, "max_steps": 2, "save_steps": 0, "logging_steps": 1, "progress_bar": False},
        "out_dir": str(tmp_path / f"run-{name}"),
    }


@pytest.mark.slow
def test_plan_predicts_the_measured_peak_rss_of_cpu_training_within_25_percent(tmp_path):
    configs = {}
    for name, (hidden, layers, intermediate) in SIZES.items():
        _llama_folder(tmp_path / name, hidden, layers, intermediate)
        configs[name] = _config(tmp_path, name)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = {"baseline": "baseline", **{name: json.dumps(cfg) for name, cfg in configs.items()}}
    children = {
        k: subprocess.Popen(
            [sys.executable, "-c", CHILD, a], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for k, a in args.items()
    }
    peak = {}
    for k, child in children.items():
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err[-2000:]
        peak[k] = int(out.strip().splitlines()[-1])
    for name, cfg in configs.items():
        shape = read_model_shape(cfg["model"]["name_or_path"])
        plan = plan_memory(load_config(cfg), shape, runtime=0, device="cpu")
        measured = peak[name] - peak["baseline"]
        print(
            f"{name}: {shape.params / 1e6:.1f}M parameters, plan {plan.total / 2**20:.0f} MiB, measured "
            f"{measured / 2**20:.0f} MiB (peak {peak[name] / 2**20:.0f} - baseline {peak['baseline'] / 2**20:.0f})"
        )
        assert abs(plan.total - measured) <= 0.25 * measured, format_plan(load_config(cfg), plan, [])


def test_parameter_count_from_config_json_equals_the_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    shape = model_shape(config.to_dict())
    assert shape.params == sum(p.numel() for p in LlamaForCausalLM(config).parameters())


def _gpu_plan(**overrides):
    shape = model_shape(
        {
            "model_type": "llama",
            "vocab_size": 128256,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "tie_word_embeddings": False,
        }
    )
    cfg = load_config(
        None,
        {
            "model.name_or_path": "meta-llama/Llama-3.1-8B",
            "model.dtype": "bfloat16",
            "train.batch_size": 4,
            "data.max_length": 2048,
            **overrides,
        },
    )
    return cfg, shape


def test_an_8b_full_fine_tune_does_not_fit_one_48gb_gpu_and_the_suggestions_say_what_does():
    cfg, shape = _gpu_plan()  # bf16 weights, gradients and AdamW moments: 64 GB before activations
    plan = plan_memory(cfg, shape, gpus=1, gpu_memory=parse_size("48GB"))
    assert shape.params == pytest.approx(8.03e9, rel=0.01)
    assert plan.part("weights") == pytest.approx(shape.params * 2) and plan.part("optimizer") == pytest.approx(
        shape.params * 4
    )
    assert plan.part("reference") == 0  # the reference cache is on by default
    assert plan.fits is False
    tips = suggestions(cfg, shape, plan)
    assert [s[1] for s in tips] == sorted((s[1] for s in tips), reverse=True)
    fitting = {text for text, _, fits in tips if fits}
    assert "lora.enabled=true model.quantization=nf4 (QLoRA)" in fitting and "lora.enabled=true" in fitting
    sharded = plan_memory(cfg, shape, gpus=8, gpu_memory=parse_size("48GB"))
    assert sharded.part("optimizer") == pytest.approx(plan.part("optimizer") / 8) and sharded.fits
    assert "does NOT fit" in format_plan(cfg, plan, tips)


def test_qlora_weights_are_a_quarter_of_bf16_for_the_linears_and_the_options_shrink_their_parts():
    cfg, shape = _gpu_plan(**{"lora.enabled": True, "model.quantization": "nf4"})
    qlora = plan_memory(cfg, shape)
    lora = plan_memory(load_config(cfg, {"model.quantization": "none"}), shape)
    linear = shape.layers * shape.layer_linear_params
    assert lora.part("weights") - qlora.part("weights") == pytest.approx(linear * (2 - 4.127 / 8))
    full = plan_memory(
        load_config(cfg, {"lora.enabled": False, "model.quantization": "none", "speed.ref_cache": False}), shape
    )
    bf16_ref = plan_memory(
        load_config(
            cfg,
            {
                "lora.enabled": False,
                "model.quantization": "none",
                "speed.ref_cache": False,
                "model.dtype": "float32",
                "model.ref_dtype": "bfloat16",
            },
        ),
        shape,
    )
    assert full.part("reference") == pytest.approx(shape.params * 2) and bf16_ref.part("reference") == pytest.approx(
        shape.params * 2
    )
    eight_bit = plan_memory(
        load_config(cfg, {"lora.enabled": False, "model.quantization": "none", "optim.name": "adamw_8bit"}), shape
    )
    assert eight_bit.part("optimizer") == pytest.approx(shape.params * (2 + 8 / 256))
    no_ckpt = plan_memory(load_config(cfg, {"train.gradient_checkpointing": False}), shape)
    assert no_ckpt.part("activations") > 5 * qlora.part("activations")
    plain = plan_memory(
        load_config(
            cfg,
            {
                "speed.chunked_logps": False,
                "speed.packing": False,
                "speed.prefix_sharing": False,
                "speed.ref_cache": False,
            },
        ),
        shape,
    )
    assert plain.part("logits") == pytest.approx(3 * 4 * 2 * 2048 * 128256 * 4)


def test_plan_verb_prints_the_parts_and_exits_1_when_it_does_not_fit(tmp_path, capsys):
    from dpokit.cli import main

    _llama_folder(tmp_path / "m", 64, 2, 128)
    assert main(["plan", "demo", f"model.name_or_path={tmp_path / 'm'}", "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "weights" in out and "activations" in out and "fits in 80 GiB" in out
    assert main(["plan", "demo", f"model.name_or_path={tmp_path / 'm'}", "--gpu-memory", "0.5GB"]) == 1
    assert "to lower the peak" in capsys.readouterr().out


def test_the_for_each_adamw_counts_a_temporary_of_every_parameter_and_the_fused_one_none():
    cfg, shape = _gpu_plan()
    assert plan_memory(cfg, shape).part("step") == 0  # optim.fused (the default) updates in place
    foreach = plan_memory(load_config(cfg, {"optim.fused": False}), shape)
    assert foreach.part("step") == pytest.approx(shape.params * 2)  # one bf16 sqrt(exp_avg_sq) per parameter
    assert plan_memory(cfg, shape, gpus=8).part("step") == pytest.approx(shape.params * 2 / 8)  # sharded: for-each


def test_a_moving_reference_is_a_live_copy_even_with_lora_or_the_cache_and_is_never_told_to_cache():
    """TR-DPO (loss.ref_sync_steps) turns the cache off and, under LoRA, keeps a merged copy of the whole model."""
    cfg, shape = _gpu_plan(**{"loss.ref_sync_steps": 64})  # speed.ref_cache is on by default
    plan = plan_memory(cfg, shape)
    assert plan.part("reference") == pytest.approx(shape.params * 2)
    lora = plan_memory(load_config(cfg, {"lora.enabled": True}), shape)
    assert lora.part("reference") == pytest.approx(shape.params * 2)  # a merged copy of the bf16 model
    assert plan_memory(load_config(cfg, {"loss.ref_sync_steps": 0, "lora.enabled": True}), shape).part("reference") == 0
    tips = {text for text, _, _ in suggestions(cfg, shape, plan)}
    assert "speed.ref_cache=true" not in tips and not any(
        "nf4" in t for t in tips
    )  # both refused with a moving reference
    assert "lora.enabled=true" in tips
    assert not any(t.startswith("--gpus") for t in tips)  # FSDP/ZeRO-3 are refused with a moving reference
    ddp = plan_memory(cfg, shape, gpus=8)
    assert ddp.part("weights") == plan.part("weights") and ddp.part("reference") == plan.part(
        "reference"
    )  # DDP: not sharded
