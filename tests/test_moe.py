"""Mixture-of-experts models: the router's load-balancing loss (aux_loss) in every step, LoRA on the experts, the plan.

Tiny Mixtral, Qwen3-MoE and Qwen2-MoE models built from transformers configs (4 experts, top-2, 16 wide) on the
word tokenizer of tiny_assets. The reference value of aux_loss is transformers' own: the model's `aux_loss` when
called with output_router_logits=True and the batch's attention mask.
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch

import dpokit
from dpokit.config import ConfigError, SpeedConfig, load_config
from dpokit.data.collate import collate_pairs
from dpokit.data.records import PreferenceExample
from dpokit.data.tokenization import tokenize_pairs
from dpokit.data.unpaired import TokenizedCompletion
from dpokit.model_shape import model_shape
from dpokit.models import apply_lora
from dpokit.plan import plan_memory
from dpokit.steps.base import StepContext
from dpokit.steps.paired import forward_pairs, forward_pairs_fast, make_collate
from dpokit.steps import FastSFTStep, SFTStep, UnpairedStep
from dpokit.steps.sft import collate_sft, make_sft_collate
from dpokit.steps.unpaired import collate_unpaired
from dpokit.tiny import save_tiny
from dpokit.training.metrics import read_metrics
from tiny_assets import session_folder, synthetic_pairs, tiny_model_dir, vocab_ids, word_tokenizer, write_jsonl

COEF = 0.02  # the tiny models' router_aux_loss_coef


def _config(kind: str):
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    tok = word_tokenizer()
    common = dict(
        vocab_size=len(tok),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_experts_per_tok=2,
        router_aux_loss_coef=COEF,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    if kind == "mixtral":
        return MixtralConfig(intermediate_size=24, num_local_experts=4, **common)
    if kind == "qwen3_moe":  # layer 1 dense (mlp_only_layers), query/key norms, head_dim != hidden / heads
        return Qwen3MoeConfig(
            intermediate_size=32, moe_intermediate_size=8, num_experts=4, head_dim=12, mlp_only_layers=[1], **common
        )
    return Qwen2MoeConfig(
        intermediate_size=32, moe_intermediate_size=8, shared_expert_intermediate_size=20, num_experts=4, **common
    )


def tiny_moe(kind: str = "mixtral", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(kind), attn_implementation="sdpa")
    with torch.no_grad():  # decisive routers (initialised at std 0.02 every token would route almost uniformly)
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 1.0)
    return model


@functools.lru_cache(maxsize=None)
def tiny_moe_dir(kind: str = "mixtral"):
    return save_tiny(tiny_moe(kind), word_tokenizer(), session_folder(f"dpokit-{kind}-") / "model")


def _cfg(**overrides):
    return load_config(None, {"model.name_or_path": "unused", "loss.beta": 0.5, **overrides})


def _pairs(n=4, seed=0):
    rows = synthetic_pairs(n, seed)
    examples = [PreferenceExample(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    return tokenize_pairs(examples, word_tokenizer(), max_length=32, max_prompt_length=16)[0]


def _router_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")])


def _run(forward, model, batch, cfg, reference=None):
    model.zero_grad(set_to_none=True)
    out, metrics = forward(model, reference, batch, StepContext(cfg, reference is not None))
    out.losses.sum().backward()
    return out.losses.detach(), metrics, _router_grads(model)


def _transformers_aux(model, batch) -> torch.Tensor:
    """The model's own load-balancing loss of a padded batch: transformers' load_balancing_loss_func with the mask."""
    return model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True
    ).aux_loss


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_aux_loss_is_transformers_load_balancing_loss_over_the_real_tokens(kind):
    model = tiny_moe(kind)
    batch = collate_pairs(_pairs(), word_tokenizer().pad_token_id)
    assert not bool(batch["attention_mask"].all())  # the batch has padding
    _, metrics = forward_pairs(model, None, batch, StepContext(_cfg(**{"loss.type": "simpo"}), False))
    expected = _transformers_aux(model, batch)
    torch.testing.assert_close(
        metrics["aux_loss"], expected.detach().expand(len(metrics["loss"])), rtol=1e-5, atol=1e-6
    )
    with_padding = model(input_ids=batch["input_ids"], output_router_logits=True).aux_loss.detach()
    assert abs(float(with_padding) - float(expected)) > 1e-3  # counting the padding would give another value


def test_the_coefficient_adds_the_aux_loss_and_its_gradient_reaches_the_router():
    model = tiny_moe("mixtral")
    batch = collate_pairs(_pairs(), word_tokenizer().pad_token_id)
    reference = copy.deepcopy(model)
    runs = {
        coef: _run(
            forward_pairs, model, batch, _cfg(**({} if coef is None else {"loss.router_aux_coef": coef})), reference
        )
        for coef in (0.0, 0.5, None)
    }
    model.zero_grad(set_to_none=True)
    aux = _transformers_aux(model, batch)
    aux.backward()
    aux_grad = _router_grads(model)
    assert aux_grad.abs().sum() > 0
    (loss0, m0, grad0), (loss5, m5, grad5), (loss_default, _, grad_default) = runs[0.0], runs[0.5], runs[None]
    torch.testing.assert_close(loss5 - loss0, torch.full_like(loss0, 0.5 * float(aux)), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss_default - loss0, torch.full_like(loss0, COEF * float(aux)), rtol=1e-4, atol=1e-6)
    # the router's gradient gains coef x d(aux_loss) (summed over the batch's pairs); with 0 it has none of it
    torch.testing.assert_close(grad5 - grad0, 0.5 * len(loss0) * aux_grad, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(grad_default - grad0, COEF * len(loss0) * aux_grad, rtol=1e-3, atol=1e-6)
    assert "aux_loss" in m0 and float(m0["aux_loss"][0]) == pytest.approx(
        float(aux), rel=1e-5
    )  # logged, not trained on
    assert float(m5["loss"].mean()) == pytest.approx(float(m0["loss"].mean()) + 0.5 * float(aux), rel=1e-5)


FAST = {
    "packing+prefix+chunked": SpeedConfig(
        packing=True, prefix_sharing=True, chunked_logps=True, pack_length=48, logps_chunk_size=5
    ),
    "packing": SpeedConfig(packing=True, prefix_sharing=False, chunked_logps=False, pack_length=48),
}


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("setting", sorted(FAST))
def test_the_fast_step_gives_the_plain_steps_loss_aux_loss_and_router_gradient(kind, setting):
    model = tiny_moe(kind)
    reference = copy.deepcopy(model)
    pairs = _pairs(6, seed=1)
    cfg = _cfg(**{"loss.router_aux_coef": 0.3})
    cfg.speed = FAST[setting]
    plain = _run(forward_pairs, model, collate_pairs(pairs, 0), cfg, reference)
    batch = make_collate(cfg.speed, "sdpa")(pairs, 0)
    assert bool((batch["segment_ids"] < 0).any()) or batch["input_ids"].shape[0] == 1  # packed rows with padding
    fast = _run(forward_pairs_fast, model, batch, cfg, reference)
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-5, atol=1e-5)
    for name in ("aux_loss", "loss"):
        torch.testing.assert_close(fast[1][name], plain[1][name], rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(fast[2], plain[2], rtol=1e-4, atol=1e-6)


def test_sft_and_kto_steps_add_the_aux_loss():
    model = tiny_moe("mixtral")
    cfg = _cfg(**{"loss.router_aux_coef": 0.3})
    examples = [
        TokenizedCompletion(vocab_ids("it is"), vocab_ids("fine"), True, 9),
        TokenizedCompletion(vocab_ids("the film was"), vocab_ids("very good <|im_end|>"), False, 9),
        TokenizedCompletion(vocab_ids("how are you"), vocab_ids("bad and awful plot"), True, 9),
    ]
    plain = _run(SFTStep().forward, model, collate_sft(examples, 0), cfg)
    fast = _run(FastSFTStep(cfg.speed, "sdpa").forward, model, make_sft_collate(cfg.speed, "sdpa")(examples, 0), cfg)
    aux = float(_transformers_aux(model, collate_sft(examples, 0)))
    for name in ("aux_loss", "loss"):
        torch.testing.assert_close(fast[1][name], plain[1][name], rtol=1e-5, atol=1e-5, msg=name)
    assert float(plain[1]["aux_loss"][0]) == pytest.approx(aux, rel=1e-5)
    tokens = torch.tensor([1, 3, 4])  # completion tokens per example: the SFT loss is a token mean
    no_aux = _run(SFTStep().forward, model, collate_sft(examples, 0), _cfg(**{"loss.router_aux_coef": 0.0}))
    torch.testing.assert_close(plain[0] - no_aux[0], 0.3 * aux * tokens.float(), rtol=1e-4, atol=1e-6)
    kto = _cfg(**{"loss.type": "kto", "loss.router_aux_coef": 0.3})
    batch = collate_unpaired(examples, 0)
    with_aux = _run(UnpairedStep().forward, model, batch, kto, copy.deepcopy(model))
    without = _run(
        UnpairedStep().forward,
        model,
        batch,
        _cfg(**{"loss.type": "kto", "loss.router_aux_coef": 0.0}),
        copy.deepcopy(model),
    )
    torch.testing.assert_close(with_aux[0] - without[0], torch.full((3,), 0.3 * aux), rtol=1e-4, atol=1e-6)


def test_a_dense_model_logs_no_aux_loss_and_refuses_a_coefficient():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir())
    batch = collate_pairs(_pairs(), 0)
    _, metrics = forward_pairs(
        model, None, batch, StepContext(_cfg(**{"loss.type": "simpo", "loss.router_aux_coef": 0.0}), False)
    )
    assert "aux_loss" not in metrics and "loss" in metrics
    with pytest.raises(ConfigError, match="loss.router_aux_coef"):
        forward_pairs(
            model, None, batch, StepContext(_cfg(**{"loss.type": "simpo", "loss.router_aux_coef": 0.1}), False)
        )
    with pytest.raises(ConfigError, match="loss.router_aux_coef"):
        _cfg(**{"loss.router_aux_coef": -1.0})


def _train(tmp_path, name, model_dir, **lora):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(16, seed=0))
    cfg = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"path": str(data), "max_length": 32, "max_prompt_length": 16},
        "loss": {"beta": 0.5},
        "optim": {"lr": 5e-2, "scheduler": "constant"},
        "out_dir": str(tmp_path / name),
        "train": {"batch_size": 8, "max_steps": 6, "logging_steps": 1, "progress_bar": False, "save_steps": 0},
    }
    if lora:
        cfg["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, **lora}
    result = dpokit.train(cfg)
    return result, [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize(
    "targets",
    [["q_proj", "k_proj", "v_proj", "o_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]],
)
def test_lora_on_attention_or_on_the_experts_trains_and_logs_aux_loss(tmp_path, targets):
    result, records = _train(tmp_path, "moe", tiny_moe_dir("mixtral"), target_modules=targets)
    assert all("aux_loss" in r and 1.0 < r["aux_loss"] <= 4.0 for r in records)  # ~top-k when balanced, E at most
    last = records[-3:]  # the last three steps against the first: DPO's loss falls, the margins grow
    assert sum(r["loss"] for r in last) / 3 < records[0]["loss"] - 0.03
    assert sum(r["rewards/margins"] for r in last) / 3 > records[0]["rewards/margins"] + 0.05
    adapter = json.loads((result.model_dir / "adapter_config.json").read_text())
    from safetensors.torch import load_file

    keys = load_file(result.model_dir / "adapter_model.safetensors")
    on_experts = [k for k in keys if ".experts." in k]
    assert bool(on_experts) == ("gate_up_proj" in targets), sorted(keys)
    assert sorted(adapter.get("target_parameters") or []) == (["down_proj", "gate_up_proj"] if on_experts else [])
    assert any(".self_attn." in k for k in keys)


def test_a_dense_run_logs_no_aux_loss(tmp_path):
    _, records = _train(tmp_path, "dense", tiny_model_dir())
    assert records and not any("aux_loss" in r for r in records)


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_plan_counts_every_expert_and_the_ones_active_per_token(kind):
    model = tiny_moe(kind)
    config = model.config
    shape = model_shape(config.to_dict())
    assert shape.params == sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)  # every layer's, every expert's
    idle = experts * (shape.experts - config.num_experts_per_tok) // shape.experts
    assert shape.active_params == shape.params - idle < shape.params


# Not qwen3_moe here: peft 0.21 moves the names down_proj/gate_proj/up_proj of a Qwen3-MoE from target_modules to the
# experts (its conversion of transformers-4 adapters), so the tiny one's dense layer (mlp_only_layers) keeps no adapter.
@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_plan_counts_the_lora_adapters_of_the_experts(kind):
    model = tiny_moe(kind)
    shape = model_shape(model.config.to_dict())
    targets = ["q_proj", "v_proj", "gate_up_proj", "down_proj"]
    lora = {"model.name_or_path": "unused", "lora.enabled": True, "lora.r": 4, "lora.target_modules": targets}
    with pytest.raises(ConfigError, match="lora.dropout=0"):  # peft adapts 3D expert weights without dropout only
        apply_lora(copy.deepcopy(model), load_config(None, lora))
    cfg = load_config(None, {**lora, "lora.dropout": 0.0})
    peft_model = apply_lora(model, cfg)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert plan_memory(cfg, shape, device="cpu").part("gradients") == 4 * trainable  # float32 adapters
