"""`dpokit train` runs the fast paired step by default (same numbers as the plain one), falls back to
the plain step where the fast one cannot run, and `dpokit precompute` fills the cache training reads."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

import dpokit
import dpokit.ref_cache.build
import dpokit.training.setup
import dpokit.training.loop
from dpokit.cli import main
from dpokit.config import load_config
from dpokit.steps.base import StepContext
from dpokit.steps import FastPairedStep, PairedStep, UnpairedStep, step_for
from dpokit.training.metrics import read_metrics
from dpokit.models import load_policy
from dpokit.packed_attention import segment_sdpa_forward
from dpokit.steps.paired import forward_pairs_fast
from dpokit.training.setup import fit_speed
from test_faults import inject
from tiny_assets import synthetic_pairs, tiny_model_dir, write_jsonl

PLAIN = {"packing": False, "prefix_sharing": False, "chunked_logps": False, "ref_cache": False}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _raw(tmp_path, name: str, **speed) -> dict:
    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        write_jsonl(data, synthetic_pairs(24, seed=5))
    return {
        "model": {"name_or_path": str(tiny_model_dir())},
        "data": {"path": str(data), "max_length": 32, "max_prompt_length": 16, "eval_fraction": 0.25},
        "loss": {"beta": 0.5},
        "optim": {"lr": 1e-2, "scheduler": "constant"},
        "speed": speed,
        "train": {"batch_size": 6, "max_steps": 3, "logging_steps": 1, "progress_bar": False, "save_steps": 0},
        "out_dir": str(tmp_path / name),
    }


def _yaml(tmp_path, name: str, **speed):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(_raw(tmp_path, name, **speed)))
    return path


def test_the_fast_step_is_the_default_and_the_plain_one_when_every_path_is_off():
    assert type(step_for(load_config(None, {}))) is FastPairedStep
    assert type(step_for(load_config(None, {f"speed.{k}": v for k, v in PLAIN.items()}))) is PairedStep
    for key in PLAIN:  # any one path on is the fast step
        assert (
            type(step_for(load_config(None, {**{f"speed.{k}": v for k, v in PLAIN.items()}, f"speed.{key}": True})))
            is FastPairedStep
        )
    assert type(step_for(load_config(None, {"loss.type": "kto"}))) is UnpairedStep  # KTO has its own step


def test_speed_keys_are_checked():
    with pytest.raises(ValueError, match="speed.pack_length"):
        load_config(None, {"speed.pack_length": -1})
    with pytest.raises(ValueError, match="did you mean 'speed.ref_cache'"):
        load_config(None, {"speed.ref_cach": False})


@pytest.mark.slow
def test_default_training_gives_the_plain_steps_numbers(tmp_path, capsys):
    plain = dpokit.train(_raw(tmp_path, "plain", **PLAIN))
    fast = dpokit.train(_raw(tmp_path, "fast"))
    out = capsys.readouterr().out
    assert "reference log-probs computed in" in out and "cached in" in out and "no reference model in memory" in out
    rows = {
        name: [r for r in read_metrics(run.run_dir / "metrics.jsonl") if "loss" in r]
        for name, run in (("plain", plain), ("fast", fast))
    }
    assert [r["step"] for r in rows["fast"]] == [1, 2, 3]
    for a, b in zip(rows["plain"], rows["fast"]):
        for key in (
            "loss",
            "rewards/margins",
            "rewards/chosen",
            "logps/chosen",
            "logps/rejected",
            "logits/chosen",
            "grad_norm",
        ):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    assert rows["fast"][-1]["loss"] < rows["fast"][0]["loss"]  # it learned something in 3 steps of lr 1e-2
    assert (
        "kl/chosen" in rows["plain"][0] and "kl/chosen" not in rows["fast"][0]
    )  # a cache has no next-token distributions
    from dpokit.report import build_report

    html = build_report(fast.run_dir).read_text()  # the KL chart says why it is empty and how to fill it
    assert "speed.ref_cache=false logs kl/chosen" in html and 'data-chart="entropy"' in html
    assert fast.metrics["eval_loss"] == pytest.approx(plain.metrics["eval_loss"], rel=1e-4)
    a, b = load_file(str(plain.model_dir / "model.safetensors")), load_file(str(fast.model_dir / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_a_model_outside_the_attention_interface_takes_the_plain_step(monkeypatch):
    cfg = load_config(None, {"model.name_or_path": str(tiny_model_dir())})
    policy = load_policy(cfg)
    fitted, task, notes = fit_speed(cfg, step_for(cfg), policy, sharded=False)
    assert type(task) is FastPairedStep and fitted.speed == cfg.speed and notes == []
    monkeypatch.setattr(type(policy), "_supports_attention_backend", False)
    fitted, task, notes = fit_speed(cfg, step_for(cfg), policy, sharded=False)
    assert type(task) is PairedStep and not fitted.speed.any_fast_path
    assert "does not use transformers' attention interface" in notes[0]


def test_sharded_training_keeps_the_fast_step_without_the_chunked_head():
    cfg = load_config(None, {"model.name_or_path": str(tiny_model_dir())})
    fitted, task, notes = fit_speed(cfg, step_for(cfg), load_policy(cfg), sharded=True)
    assert type(task) is FastPairedStep
    assert (
        not fitted.speed.chunked_logps
        and fitted.speed.packing
        and fitted.speed.prefix_sharing
        and fitted.speed.ref_cache
    )
    assert "chunked_logps is off" in notes[0]


def test_packed_attention_refuses_a_placeholder_mask_that_lost_its_units():
    module = torch.nn.Module()
    module.is_causal = True
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(RuntimeError, match="did not pass dpokit's packed-attention arguments"):
        segment_sdpa_forward(module, q, q, q, torch.ones(1, 1, 1, 1, dtype=torch.bool))
    # a one-token query (generation with a cache) is plain SDPA
    out, _ = segment_sdpa_forward(module, q[:, :, -1:], q, q, torch.ones(1, 1, 1, 5, dtype=torch.bool))
    assert out.shape == (1, 1, 2, 4)


@pytest.mark.slow
def test_precompute_fills_the_cache_that_train_then_reads(tmp_path, monkeypatch, capsys):
    config = _yaml(tmp_path, "run")
    assert main(["precompute", str(config)]) == 0
    assert "reference log-probs of 18 train / 6 eval pairs built in" in capsys.readouterr().out
    assert main(["precompute", str(config)]) == 0
    assert "already up to date" in capsys.readouterr().out

    def forbidden(*args, **kwargs):
        raise AssertionError("a reference model was built although `dpokit precompute` made the cache")

    monkeypatch.setattr(dpokit.training.setup, "make_reference", forbidden)
    monkeypatch.setattr(dpokit.ref_cache.build, "_load_reference", forbidden)
    assert main(["train", str(config)]) == 0
    assert "reference log-probs read from the cache" in capsys.readouterr().out


def test_precompute_refuses_losses_without_cached_reference_log_probs(tmp_path, capsys):
    config = _yaml(tmp_path, "run")
    assert main(["precompute", str(config), "loss.type=simpo"]) == 2
    assert "only paired losses that use a reference" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_stopped_by_non_finite_losses_exits_with_status_1(tmp_path, monkeypatch, capsys):
    inject(monkeypatch, set(range(1, 100)))
    config = _yaml(tmp_path, "nan")
    assert main(["train", str(config), "train.max_skipped_steps=1", "data.eval_fraction=0"]) == 1
    assert "no final model was saved" in capsys.readouterr().err


def _tiny(arch: str):
    import transformers

    common = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    configs = {
        "qwen2": lambda: transformers.Qwen2Config(**common, num_key_value_heads=2),
        "gemma2": lambda: transformers.Gemma2Config(**common, num_key_value_heads=2, head_dim=8),  # logit softcapping
        "phi3": lambda: transformers.Phi3Config(**common, num_key_value_heads=2, pad_token_id=0),
        "gpt2": lambda: transformers.GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=4),  # learned positions
        "opt": lambda: transformers.OPTConfig(
            vocab_size=101,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=64,
            word_embed_proj_dim=32,
        ),
        "falcon": lambda: transformers.FalconConfig(
            vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4
        ),
    }
    impl = "eager" if arch == "gemma2" else "sdpa"  # gemma2 has no sdpa in transformers 5
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(configs[arch](), attn_implementation=impl).eval(), impl


@pytest.mark.parametrize("arch", ["qwen2", "gemma2", "phi3", "gpt2", "opt", "falcon"])
def test_the_fast_step_matches_the_plain_step_on_other_architectures_or_is_not_used(arch):
    """Falcon keeps its own attention code: packed rows would attend across pairs, so it must get the plain step."""
    import copy

    from dpokit.data.collate import collate_pairs
    from dpokit.data.tokenization import TokenizedPair
    from dpokit.steps.paired import forward_pairs
    from dpokit.steps.token_scores import fast_path_blocker

    model, impl = _tiny(arch)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(3, 100, (n,), generator=g).tolist()  # noqa: E731
    pairs = [
        TokenizedPair(ids(p), ids(c), ids(r), f"row {i}")
        for i, (p, c, r) in enumerate([(5, 4, 6), (3, 7, 2), (8, 3, 3), (4, 5, 5)])
    ]
    cfg = load_config(None, {"loss.beta": 0.5, "model.attn_implementation": impl})
    plain, _ = forward_pairs(model, reference, collate_pairs(pairs, 0), StepContext(cfg))
    if arch == "falcon":
        assert "does not use transformers' attention interface" in fast_path_blocker(model)
        return
    assert fast_path_blocker(model) is None
    fast, _ = forward_pairs_fast(model, reference, step_for(cfg).collate(pairs, 0), StepContext(cfg))
    torch.testing.assert_close(fast.losses, plain.losses, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast.chosen_rewards, plain.chosen_rewards, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_lora_from_the_cache_still_evaluates_kl_with_the_adapters_off(tmp_path):
    """LoRA's reference is free (adapters off): training reads the cache, evaluation runs it live for eval_kl/chosen."""
    lora = {"enabled": True, "r": 4, "dropout": 0.0}
    cached = dpokit.train({**_raw(tmp_path, "cached"), "lora": lora})
    live = dpokit.train({**_raw(tmp_path, "live", ref_cache=False), "lora": lora})
    rows = {name: read_metrics(run.run_dir / "metrics.jsonl") for name, run in (("cached", cached), ("live", live))}
    train_cached = [r for r in rows["cached"] if "loss" in r]
    assert train_cached and "kl/chosen" not in train_cached[0]  # training steps read the cache
    assert "kl/chosen" in [r for r in rows["live"] if "loss" in r][0]
    assert cached.metrics["eval_kl/chosen"] > 0
    for key in ("eval_loss", "eval_kl/chosen", "eval_rewards/margins", "eval_entropy"):
        assert cached.metrics[key] == pytest.approx(live.metrics[key], rel=1e-4, abs=1e-6), key
