"""Memory options (issue 11.4): QLoRA (NF4 base + LoRA), a lower-precision live reference, 8-bit AdamW.

bitsandbytes >= 0.46 runs NF4 layers and AdamW8bit on CPU, so the QLoRA run here is real (no mock).
"""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch

import dpokit
from dpokit.config import ConfigError, load_config
from dpokit.data.collate import collate_pairs
from dpokit.data.prepare import prepare_data
from dpokit.model_source import ModelLoadError
from dpokit.models import load_policy, load_tokenizer, quantization_config
from dpokit.optimizers import build_optimizer
from dpokit.reference import make_reference
from dpokit.steps.base import StepContext
from dpokit.steps.paired import forward_pairs
from dpokit.training.metrics import read_metrics
from tiny_assets import synthetic_pairs, tiny_model_dir, write_jsonl

bnb = pytest.importorskip("bitsandbytes")


def _overrides(tmp_path, **extra) -> dict:
    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        write_jsonl(data, synthetic_pairs(8, seed=2))
    cfg = {
        "model.name_or_path": str(tiny_model_dir()),
        "data.path": str(data),
        "data.max_length": 32,
        "data.max_prompt_length": 16,
        "loss.beta": 0.5,
        "train.batch_size": 4,
        "train.max_steps": 2,
        "train.logging_steps": 1,
        "train.save_steps": 0,
        "train.progress_bar": False,
        "speed.ref_cache_dir": str(tmp_path / "cache"),
        "out_dir": str(tmp_path / "run"),
    }
    cfg.update(extra)
    return cfg


def test_the_options_are_checked_where_they_are_read():
    with pytest.raises(ConfigError, match="set lora.enabled=true"):
        load_config(None, {"model.quantization": "nf4"})
    with pytest.raises(ConfigError, match="no copy to cast"):
        load_config(None, {"model.ref_dtype": "bfloat16", "lora.enabled": True})
    with pytest.raises(ConfigError, match="optim.name.*adamw_8bit"):
        load_config(None, {"optim.name": "adam8"})


def test_bits_and_bytes_config_follows_qlora_and_is_refused_in_one_line_without_bitsandbytes(monkeypatch):
    cfg = load_config(None, {"lora.enabled": True, "model.quantization": "nf4", "model.dtype": "bfloat16"})
    q = quantization_config(cfg)
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant, q.bnb_4bit_compute_dtype) == (
        True,
        "nf4",
        True,
        torch.bfloat16,
    )
    assert quantization_config(load_config(None, {})) is None
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ModelLoadError) as e:
        quantization_config(cfg)
    assert "pip install 'dpokit[quantization]'" in str(e.value) and "\n" not in str(e.value)


# bitsandbytes' CPU 4-bit kernels (the AVX-512 bf16 repack) need input widths that are multiples of its 64-value
# block and output widths that are multiples of 32: the QLoRA model is 64 wide (intermediate 128).
QLORA = {"lora.enabled": True, "lora.r": 4, "model.quantization": "nf4"}


def _qlora_model() -> str:
    return str(tiny_model_dir(hidden_size=64))


@pytest.mark.slow
def test_qlora_trains_adapters_on_a_4bit_base_whose_adapters_off_is_the_reference(tmp_path):
    overrides = _overrides(tmp_path, **QLORA, **{"model.name_or_path": _qlora_model(), "optim.lr": 1e-2})
    cfg = load_config(None, overrides)
    policy = load_policy(cfg)
    linears = [m for m in policy.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears and all(m.weight.quant_state.quant_type == "nf4" for m in linears)
    assert {n for n, p in policy.named_parameters() if p.requires_grad} and all(
        "lora_" in n for n, p in policy.named_parameters() if p.requires_grad
    )
    assert (
        make_reference(policy, cfg, needs_reference=True) is None
    )  # the reference is the quantized base, adapters off
    dpokit.train(cfg)  # the reference cache is built from that base, with the adapters disabled
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # LoRA B starts at 0: policy == reference
    assert records[-1]["loss"] < records[0]["loss"]


def test_every_4bit_layer_of_the_qlora_model_repacks_for_the_avx512_bf16_cpu_kernel():
    """The path an Intel Xeon with AVX-512 bf16 takes at the first no-grad forward (the reference cache), run here on
    any CPU: bitsandbytes.functional._convert_weight_packed_for_cpu, which failed on the 32-wide model with
    "shape '[32, 0]' is invalid" (its input width was below the 64-value block)."""
    policy = load_policy(load_config(None, {"model.name_or_path": _qlora_model(), **QLORA}))
    linears = [m for m in policy.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears
    for layer in linears:
        packed, state = bnb.functional._convert_weight_packed_for_cpu(
            layer.weight.data.clone(), copy.deepcopy(layer.weight.quant_state)
        )
        assert state.packing_format_for_cpu and packed.shape == (layer.out_features, layer.in_features // 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU kernels' constraint")
def test_4bit_widths_the_cpu_kernel_cannot_pack_are_refused_in_one_line_at_load(monkeypatch):
    monkeypatch.setattr(bnb.functional, "has_avx512bf16", lambda: True)  # as on an Intel Xeon with AVX-512 bf16
    with pytest.raises(ModelLoadError) as e:
        load_policy(load_config(None, {"model.name_or_path": str(tiny_model_dir()), **QLORA}))  # 32 wide
    assert "multiples of 64" in str(e.value) and "in_features=32" in str(e.value) and "\n" not in str(e.value)


def test_a_bf16_reference_beside_a_float32_policy_gives_a_bf16_copys_log_probs(tmp_path):
    cfg = load_config(None, _overrides(tmp_path, **{"model.ref_dtype": "bfloat16"}))
    policy = load_policy(cfg)
    reference = make_reference(policy, cfg, needs_reference=True)
    assert {p.dtype for p in reference.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    tokenizer = load_tokenizer(cfg)
    batch = collate_pairs(prepare_data(cfg, tokenizer).train[:4], tokenizer.pad_token_id)
    by_hand = copy.deepcopy(policy).to(torch.bfloat16).eval()
    out, metrics = forward_pairs(policy, reference, batch, StepContext(cfg))
    out_hand, metrics_hand = forward_pairs(policy, by_hand, batch, StepContext(cfg))
    torch.testing.assert_close(out.losses, out_hand.losses, rtol=0, atol=0)
    torch.testing.assert_close(metrics["rewards/chosen"], metrics_hand["rewards/chosen"], rtol=0, atol=0)
    full, _ = forward_pairs(
        policy, make_reference(policy, load_config(cfg, {"model.ref_dtype": None}), True), batch, StepContext(cfg)
    )
    assert not torch.equal(full.losses, out.losses)  # the rounding is real: the option changes the reference


@pytest.mark.slow
def test_training_with_a_bf16_live_reference_runs_and_learns(tmp_path):
    dpokit.train(
        load_config(
            None,
            _overrides(
                tmp_path,
                **{"model.ref_dtype": "bfloat16", "speed.ref_cache": False, "optim.lr": 3e-3, "train.max_steps": 4},
            ),
        )
    )
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert (
        all(math.isfinite(x) for x in losses)
        and losses[0] == pytest.approx(math.log(2), abs=0.05)
        and losses[-1] < losses[0]
    )


def test_build_optimizer_picks_by_optim_name_and_keeps_the_groups(monkeypatch):
    params = [torch.nn.Parameter(torch.randn(8192)), torch.nn.Parameter(torch.randn(16))]
    groups = [{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}]
    cfg = load_config(None, {"optim.lr": 1e-3, "optim.weight_decay": 0.1})
    adamw = build_optimizer(cfg, groups)
    assert type(adamw) is torch.optim.AdamW and [g["weight_decay"] for g in adamw.param_groups] == [0.1, 0.0]
    eight = build_optimizer(load_config(cfg, {"optim.name": "adamw_8bit"}), groups)
    assert isinstance(eight, bnb.optim.AdamW8bit) and eight.param_groups[0]["lr"] == 1e-3
    params[0].grad, params[1].grad = torch.randn(8192), torch.randn(16)
    eight.step()
    assert eight.state[params[0]]["state1"].dtype == torch.uint8  # 8-bit moments for the large tensor
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(
        ConfigError, match=r"optim.name=adamw_8bit needs bitsandbytes: pip install 'dpokit\[quantization\]'"
    ):
        build_optimizer(load_config(cfg, {"optim.name": "adamw_8bit"}), groups)


def test_adamw_is_fused_by_default_for_each_when_asked_or_sharded_and_both_give_the_same_update():
    def run(**options):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(7))]
        cfg = load_config(None, {"optim.lr": 1e-2, "optim.weight_decay": 0.1, **options.get("keys", {})})
        optimizer = build_optimizer(cfg, [{"params": params}], sharded=options.get("sharded", False))
        for step in range(3):
            for p in params:
                p.grad = torch.sin(p.detach() * (step + 1))
            optimizer.step()
        return optimizer.defaults["fused"], torch.cat([p.detach() for p in params])

    fused, a = run()
    assert fused is True
    foreach, b = run(keys={"optim.fused": False})
    assert not foreach
    assert not run(sharded=True)[0]  # FSDP / DeepSpeed wrap the parameters: for-each whatever optim.fused says
    assert not torch.equal(a, torch.zeros_like(a)) and torch.allclose(a, b, rtol=0, atol=1e-6)
