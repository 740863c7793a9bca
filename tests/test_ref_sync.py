"""TR-DPO's moving reference (loss.ref_sync_steps, loss.ref_sync_alpha): the formula, the loop, LoRA, and exact resume.

After a sync the reference holds alpha * policy + (1 - alpha) * ref for every weight; a run killed
after a sync and resumed continues with the moved reference and ends where an uninterrupted run ends.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpokit
import dpokit.training.loop
from dpokit.config import ConfigError, load_config
from dpokit.models import load_policy
from dpokit.reference import make_reference
from dpokit.tiny import build_tiny_llama
from dpokit.training.checkpoint import CheckpointError, list_checkpoints
from dpokit.training.metrics import read_metrics
from dpokit.training.ref_sync import policy_weights, sync_reference
from tiny_assets import synthetic_pairs, tiny_model_dir, torchrun, word_tokenizer, write_jsonl

STEPS = 5


def _config(tmp_path: Path, name: str, **extra) -> dict:
    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_jsonl(data, synthetic_pairs(24, seed=1))
    cfg = {
        "model": {"name_or_path": str(tiny_model_dir())},
        "data": {"path": str(data), "max_length": 32},
        "loss": {"beta": 0.5, "ref_sync_steps": 2, "ref_sync_alpha": 0.5},
        "optim": {"lr": 3e-3},
        "train": {
            "batch_size": 4,
            "max_steps": STEPS,
            "logging_steps": 1,
            "save_steps": 3,
            "save_total_limit": 0,
            "progress_bar": False,
        },
        "out_dir": str(tmp_path / name),
    }
    for key, value in extra.items():
        section, field = key.split(".")
        cfg.setdefault(section, {})[field] = value
    return cfg


def _assert_formula(reference: dict, policy: dict, before: dict, alpha: float) -> None:
    for name, value in reference.items():
        torch.testing.assert_close(value, alpha * policy[name] + (1 - alpha) * before[name], msg=name)


def test_sync_gives_alpha_policy_plus_one_minus_alpha_reference():
    policy = build_tiny_llama(word_tokenizer(), hidden_size=32, num_layers=2, num_heads=4, seed=0)
    reference = build_tiny_llama(word_tokenizer(), hidden_size=32, num_layers=2, num_heads=4, seed=1)
    before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    sync_reference(reference, policy, 0.3)
    after = dict(reference.named_parameters())
    _assert_formula(after, dict(policy.named_parameters()), before, 0.3)
    assert not torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    sync_reference(reference, policy, 1.0)  # alpha = 1: a hard update, the reference becomes the policy
    for name, value in reference.named_parameters():
        assert torch.equal(value, dict(policy.named_parameters())[name]), name


def test_lora_reference_is_a_merged_copy_and_moves_towards_the_merged_policy():
    cfg = load_config(
        {
            "model": {"name_or_path": str(tiny_model_dir())},
            "lora": {"enabled": True, "r": 4},
            "loss": {"ref_sync_steps": 1},
            "train": {"gradient_checkpointing": False},
        }
    )
    policy = load_policy(cfg)
    reference = make_reference(policy, cfg, needs_reference=True)
    base = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): p
        for n, p in policy.named_parameters()
        if "lora_" not in n
    }
    for (
        name,
        value,
    ) in reference.named_parameters():  # lora_B starts at zero: the copy equals the adapters-off reference
        assert torch.equal(value, base[name]), name
    with torch.no_grad():  # a trained adapter
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    merged = dict(copy.deepcopy(policy).merge_and_unload().named_parameters())  # what peft itself merges
    ours = policy_weights(policy)
    assert ours.keys() == merged.keys()
    for name in merged:
        torch.testing.assert_close(ours[name], merged[name], msg=name)
    assert not torch.equal(
        ours["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )
    before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    sync_reference(reference, policy, 0.25)
    _assert_formula(dict(reference.named_parameters()), merged, before, 0.25)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_run_syncs_every_n_steps_after_the_update(tmp_path, capsys, lora):
    extra = {"lora.enabled": True, "lora.r": 4} if lora else {}
    run_dir = dpokit.train(_config(tmp_path, "run", **{"train.max_steps": 2, "train.save_steps": 1, **extra})).run_dir
    assert (
        "speed.ref_cache is off" in capsys.readouterr().out
    )  # the cache cannot hold a moving reference: said, and off
    first, second = list_checkpoints(run_dir)
    assert not (first / "reference.safetensors").exists()  # step 1: not moved yet, nothing extra saved
    reference = load_file(str(second / "reference.safetensors"))
    initial = load_file(str(tiny_model_dir() / "model.safetensors"))
    if lora:  # the policy after step 2 = the base plus its trained adapter, merged
        cfg = load_config(_config(tmp_path, "x", **extra))
        policy = load_policy(cfg)
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(policy, load_file(str(second / "adapter_model.safetensors")))
        trained = {n: p.detach() for n, p in policy_weights(policy).items()}
    else:
        trained = load_file(str(second / "model.safetensors"))
    assert reference.keys() <= trained.keys()
    _assert_formula(reference, trained, initial, 0.5)


def _weights(folder: Path, name: str) -> dict:
    return load_file(str(folder / name))


def _fail_on_call(monkeypatch, call: int) -> None:
    original, calls = dpokit.training.loop.accumulate_gradients, []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(dpokit.training.loop, "accumulate_gradients", wrapper)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_kill_after_a_sync_then_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, lora):
    extra = {"lora.enabled": True, "lora.r": 4, "lora.dropout": 0.1} if lora else {}
    whole = dpokit.train(_config(tmp_path, "whole", **extra)).run_dir
    _fail_on_call(monkeypatch, call=5)  # dies in step 5: checkpoint-3 holds the reference moved at step 2
    with pytest.raises(RuntimeError, match="simulated crash"):
        dpokit.train(_config(tmp_path, "run", **extra))
    monkeypatch.undo()
    run_dir = Path(_config(tmp_path, "run")["out_dir"])
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-3"]
    assert (list_checkpoints(run_dir)[0] / "reference.safetensors").is_file()
    resumed = dpokit.train(_config(tmp_path, "run", **extra)).run_dir  # resume=auto; syncs again at step 4
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    for name in (f"final/{weights}", f"checkpoints/checkpoint-{STEPS}/reference.safetensors"):
        a, b = _weights(resumed, name), _weights(whole, name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)  # bit for bit
    got, want = [[r for r in read_metrics(d / "metrics.jsonl") if "loss" in r] for d in (resumed, whole)]
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(got, want):
        for key in ("loss", "rewards/margins", "kl/chosen", "grad_norm"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)


def test_resuming_a_moved_reference_without_a_sync_is_refused(tmp_path):
    cfg = _config(tmp_path, "run", **{"lora.enabled": True, "lora.r": 4, "train.max_steps": 2, "train.save_steps": 2})
    dpokit.train(cfg)
    cfg["loss"]["ref_sync_steps"] = 0
    cfg["train"]["max_steps"] = 3
    with pytest.raises(
        CheckpointError, match="loss.ref_sync_steps"
    ):  # LoRA without a sync has no reference copy to restore
        dpokit.train(cfg)


def test_settings_the_sync_cannot_serve_are_refused_naming_the_keys(tmp_path):
    base = {"model": {"name_or_path": "x"}, "loss": {"ref_sync_steps": 4}}
    with pytest.raises(ConfigError, match="loss.ref_sync_alpha"):
        load_config(base, ["loss.ref_sync_alpha=0"])
    with pytest.raises(ConfigError, match="loss.ref_sync_steps"):
        load_config(base, ["loss.ref_sync_steps=-1"])
    with pytest.raises(ConfigError, match="uses no reference"):
        load_config(base, ["loss.type=simpo"])
    with pytest.raises(ConfigError, match="model.quantization"):
        load_config(base, ["lora.enabled=true", "model.quantization=nf4"])
    other = str(tiny_model_dir(hidden_size=16))  # same tokenizer, other shapes: nothing to mix weight by weight
    with pytest.raises(ConfigError, match="model.ref_name_or_path"):
        dpokit.train(_config(tmp_path, "run", **{"model.ref_name_or_path": other, "train.max_steps": 1}))


_DDP_RUN = """
import json, sys
sys.path.insert(0, {tests!r})
import dpokit
dpokit.train(json.loads(sys.argv[1]))
"""


@pytest.mark.slow
def test_two_processes_sync_like_one_process(tmp_path):
    """DDP over gloo: each process syncs its replica from its unwrapped policy; beta-DPO's margins are reduced over both.

    33 pairs: the last micro-batch of the epoch leaves the second process a dummy (weight 0) micro-batch.
    """
    write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(33, seed=1))
    extra = {"loss.beta_schedule": "adaptive", "loss.beta_adaptive_alpha": 2.0, "train.max_steps": 6}
    one = dpokit.train(_config(tmp_path, "one", **{**extra, "train.batch_size": 8})).run_dir
    script = tmp_path / "ddp_run.py"
    script.write_text(_DDP_RUN.format(tests=str(Path(__file__).resolve().parent)))
    proc = torchrun(str(script), json.dumps(_config(tmp_path, "two", **{**extra, "train.batch_size": 4})))
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two"
    curves = [[r for r in read_metrics(Path(d) / "metrics.jsonl") if "loss" in r] for d in (two, one)]
    assert [r["step"] for r in curves[0]] == list(range(1, 7))
    for a, b in zip(*curves):
        for key in ("loss", "beta", "rewards/margins", "kl/chosen", "grad_norm"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
    for name in ("final/model.safetensors", "checkpoints/checkpoint-6/reference.safetensors"):
        a, b = _weights(two, name), _weights(one, name)
        for key in b:
            assert torch.allclose(a[key], b[key], atol=1e-5, rtol=0), (name, key)
