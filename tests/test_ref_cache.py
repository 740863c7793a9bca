"""The reference log-prob cache: built once, reused without a reference model, rebuilt when its inputs change."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

import dpokit.models
import dpokit.ref_cache.build
import dpokit.reference
import dpokit.training.setup
from dpokit.config import load_config
from dpokit.data.collate import collate_pairs
from dpokit.data.prepare import prepare_data
from dpokit.models import load_policy, load_tokenizer
from dpokit.reference import make_reference
from dpokit.config import SpeedConfig
from dpokit.steps.base import StepContext
from dpokit.steps.paired import forward_pairs, forward_pairs_fast, make_collate
from dpokit.ref_cache.build import ensure_reference_cache, precompute_reference
from dpokit.ref_cache.store import CacheMismatch, attach, read_split
from tiny_assets import synthetic_pairs, tiny_model_dir, write_jsonl


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _config(tmp_path, model_dir=None, data=None, **overrides):
    data = data or write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(12, seed=3))
    cfg = {
        "model.name_or_path": str(model_dir or tiny_model_dir()),
        "data.path": str(data),
        "data.max_length": 32,
        "data.max_prompt_length": 16,
        "data.eval_fraction": 0.25,
        "loss.beta": 0.5,
        "train.batch_size": 4,
    }
    cfg.update(overrides)
    return load_config(None, cfg)


class _Loads:
    """Counts model loads (dpokit.models.load_policy, which every path to a reference goes through)."""

    def __init__(self, monkeypatch, forbid=False):
        self.n = 0
        real = dpokit.models.load_policy

        def load(cfg):
            self.n += 1
            if forbid:
                raise AssertionError("a model was loaded although the reference cache exists")
            return real(cfg)

        for module in (dpokit.models, dpokit.reference, dpokit.ref_cache.build):  # where it is called from
            monkeypatch.setattr(module, "load_policy", load)
        if forbid:

            def no_reference(*args, **kwargs):
                raise AssertionError("a reference model was built although the reference cache exists")

            monkeypatch.setattr(dpokit.training.setup, "make_reference", no_reference)
            from transformers import AutoModelForCausalLM

            monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_reference)


def test_second_run_reuses_the_cache_without_any_model(tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    loads = _Loads(monkeypatch)
    folder = precompute_reference(cfg)
    assert loads.n == 1 and (folder / "train.safetensors").exists() and (folder / "eval.safetensors").exists()
    monkeypatch.undo()
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    _Loads(monkeypatch, forbid=True)
    assert precompute_reference(cfg) == folder
    tokenizer = load_tokenizer(cfg)
    cache, data = ensure_reference_cache(cfg, tokenizer, prepare_data(cfg, tokenizer))
    assert not cache.built and cache.folder == folder
    assert all(p.reference is not None for p in data.train + data.eval)


def test_cached_values_equal_a_live_reference_and_training_from_them_matches(tmp_path):
    cfg = _config(tmp_path)
    tokenizer = load_tokenizer(cfg)
    data = prepare_data(cfg, tokenizer)
    cache, cached = ensure_reference_cache(cfg, tokenizer, data)
    assert cache.built
    policy = load_policy(cfg)
    reference = make_reference(policy, cfg, needs_reference=True)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    pairs = data.train[:5]
    policy.zero_grad()
    out_live, m_live = forward_pairs(policy, reference, collate_pairs(pairs, 0), StepContext(cfg))
    out_live.losses.sum().backward()
    g_live = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    speed = SpeedConfig()
    batch = make_collate(speed)(cached.train[:5], 0)
    assert "ref_logps" in batch
    out_cached, m_cached = forward_pairs_fast(policy, None, batch, StepContext(cfg))  # no reference model at all
    out_cached.losses.sum().backward()
    torch.testing.assert_close(out_cached.losses, out_live.losses, rtol=0, atol=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "logps/chosen"):
        torch.testing.assert_close(m_cached[name], m_live[name], rtol=0, atol=1e-5)
    assert "kl/chosen" not in m_cached  # needs the reference's distributions, which a cache does not hold
    for name, g in g_live.items():
        torch.testing.assert_close(policy.get_parameter(name).grad, g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("change", ["data", "tokenizer", "weights", "max_length"])
def test_cache_is_rebuilt_when_an_input_changes(tmp_path, monkeypatch, change):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir(), model_dir)
    cfg = _config(tmp_path, model_dir=model_dir)
    first = precompute_reference(cfg)
    data_path = tmp_path / "pairs.jsonl"
    overrides = {}
    if change == "data":
        write_jsonl(data_path, synthetic_pairs(12, seed=3)[:-1] + synthetic_pairs(1, seed=9))
    elif change == "tokenizer":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        tok.chat_template = (tok.chat_template or "") + "{# changed #}"
        tok.save_pretrained(model_dir)
    elif change == "weights":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir)
        with torch.no_grad():
            model.lm_head.weight[0, 0] += 1.0
        model.save_pretrained(model_dir)
    else:
        overrides["data.max_length"] = 24
    cfg2 = _config(tmp_path, model_dir=model_dir, data=data_path, **overrides)
    loads = _Loads(monkeypatch)
    second = precompute_reference(cfg2)
    assert second != first and loads.n == 1
    assert read_split(second, "train", second.name) is None  # files carry the full fingerprint, not the folder name
    # the unchanged config still finds its own cache (when its inputs are still on disk unchanged)
    if change == "max_length":
        assert precompute_reference(cfg) == first and loads.n == 1


def test_a_reordered_split_fails_loudly(tmp_path):
    cfg = _config(tmp_path)
    tokenizer = load_tokenizer(cfg)
    data = prepare_data(cfg, tokenizer)
    cache, _ = ensure_reference_cache(cfg, tokenizer, data)
    table = read_split(cache.folder, "train", cache.digest)
    with pytest.raises(CacheMismatch, match="pair 0"):
        attach(list(reversed(data.train)), table)
    with pytest.raises(CacheMismatch, match="holds"):
        attach(data.train[:-1], table)


def test_lora_policy_builds_the_cache_with_adapters_off(tmp_path):
    """Built from an (adapted) LoRA policy, the cache holds the base model's log-probs."""
    cfg = _config(tmp_path, **{"lora.enabled": True, "lora.r": 4, "lora.dropout": 0.0})
    policy = load_policy(cfg)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    tokenizer = load_tokenizer(cfg)
    data = prepare_data(cfg, tokenizer)
    _, from_lora = ensure_reference_cache(cfg, tokenizer, data, model=policy)
    assert policy.training  # handed back in the mode it came in
    base = load_policy(_config(tmp_path))
    base_ref = make_reference(base, _config(tmp_path), True)
    _, m = forward_pairs(base, base_ref, collate_pairs(data.train[:4], 0), StepContext(_config(tmp_path)))
    cached = torch.tensor([p.reference[0] for p in from_lora.train[:4]])
    torch.testing.assert_close(cached, m["logps/chosen"], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_training_twice_builds_no_reference_the_second_time(tmp_path, monkeypatch):
    """dpokit.train computes the cache on the first run; the second run reads it and never builds a reference."""
    import dpokit
    import dpokit.ref_cache.build
    import dpokit.training.setup
    import dpokit.training.loop
    from dpokit.training.metrics import read_metrics

    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(24, seed=5))

    def run(name, **speed):
        cfg = {
            "model": {"name_or_path": str(tiny_model_dir())},
            "data": {"path": str(data), "max_length": 32, "max_prompt_length": 16},
            "loss": {"beta": 0.5},
            "optim": {"lr": 1e-2, "scheduler": "constant"},
            "speed": speed,
            "train": {"batch_size": 8, "max_steps": 3, "logging_steps": 1, "progress_bar": False, "save_steps": 0},
            "out_dir": str(tmp_path / name),
        }
        result = dpokit.train(cfg)
        return [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]

    live = run("live", ref_cache=False)
    first = run("first")
    assert (tmp_path / "cache" / "ref_logps").is_dir()

    def forbidden(*args, **kwargs):
        raise AssertionError("a reference model was built although the reference cache exists")

    monkeypatch.setattr(dpokit.training.setup, "make_reference", forbidden)
    monkeypatch.setattr(dpokit.ref_cache.build, "_load_reference", forbidden)
    second = run("second")
    for a, b, c in zip(live, first, second):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(b["loss"] - c["loss"]) < 1e-6
    assert "kl/chosen" in live[0] and "kl/chosen" not in second[0]


def test_a_separate_reference_model_is_the_one_cached(tmp_path):
    """model.ref_name_or_path: the cache holds that model's log-probs (and is keyed by its weights), not the policy's."""
    from transformers import AutoModelForCausalLM

    ref_dir = tmp_path / "ref"
    shutil.copytree(tiny_model_dir(), ref_dir)
    ref_model = AutoModelForCausalLM.from_pretrained(ref_dir)
    with torch.no_grad():
        for p in ref_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref_model.save_pretrained(ref_dir)
    cfg = _config(tmp_path, **{"model.ref_name_or_path": str(ref_dir)})
    tokenizer = load_tokenizer(cfg)
    data = prepare_data(cfg, tokenizer)
    policy = load_policy(cfg)
    cache, cached = ensure_reference_cache(cfg, tokenizer, data, model=policy)  # the policy must not be used
    plain, _ = ensure_reference_cache(_config(tmp_path), tokenizer, data, model=policy)
    assert cache.folder != plain.folder
    reference = make_reference(policy, cfg, True)
    _, m = forward_pairs(reference, copy.deepcopy(reference), collate_pairs(data.train[:4], 0), StepContext(cfg))
    torch.testing.assert_close(
        torch.tensor([p.reference[0] for p in cached.train[:4]]), m["logps/chosen"], rtol=0, atol=1e-5
    )
