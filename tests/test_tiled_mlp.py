"""speed.tiled_mlp: the decoder MLPs over sequence chunks give the untiled numbers, and never see a whole sequence.

Tiny models, float32; the memory it saves is measured in bench/long_context.py (docs/benchmarks.md).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from dpokit.config import ConfigError, SpeedConfig, load_config
from dpokit.models import load_policy
from dpokit.reference import make_reference
from dpokit.steps.paired import forward_pairs_fast, make_collate
from dpokit.tiled_mlp import TiledMLP, dense_mlps, tile_mlps, untile_mlps
from tiny_assets import tiny_model_dir
from test_fast_paths import _cfg, _moved, _pairs, _run

ATOL = 1e-6


def _qwen(seed=0):
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=88,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config).train()


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _mlp_input_tokens(model):
    """A list that collects the token count of every input of every gate_proj (the 4864-wide matmul of a real layer)."""
    seen = []
    for mlp in dense_mlps(model):
        mlp.gate_proj.register_forward_hook(lambda m, args, out: seen.append(args[0].numel() // args[0].shape[-1]))
    return seen


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiled_mlp_equals_untiled_in_loss_and_gradients(checkpointing):
    model = _qwen()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 97, (2, 45), generator=torch.Generator().manual_seed(1))
    loss0, grads0 = _loss_and_grads(model, ids)
    assert tile_mlps(model, 8) == 2  # one MLP per decoder layer
    seen = _mlp_input_tokens(model)
    loss1, grads1 = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=ATOL)
    assert grads1.keys() == grads0.keys() and any("mlp" in n for n in grads0)
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=0, atol=ATOL, msg=name)
    assert seen and max(seen) <= 8  # 90 tokens, never more than one 8-token tile through the wide projection
    untile_mlps(model)
    seen.clear()
    _loss_and_grads(model, ids)
    assert max(seen) == 90


def test_short_inputs_and_no_grad_forward():
    model = _qwen()
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    tile_mlps(model, 7)
    seen = _mlp_input_tokens(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain, rtol=0, atol=ATOL)
    assert max(seen) <= 7
    tile_mlps(model, 64)  # longer than the sequence: the MLP runs as it always did
    seen.clear()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain, rtol=0, atol=ATOL)
    assert seen == [30, 30]


def test_dropout_inside_the_mlp_is_recomputed_with_the_forward_masks():
    """A random op in the MLP (LoRA dropout): backward's recomputation draws the masks the forward drew."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 6))
    x = torch.randn(2, 11, 6, requires_grad=True)
    weights = list(mlp.parameters())

    torch.manual_seed(5)
    expected = torch.cat([mlp(piece) for piece in x.reshape(-1, 6).split(4)]).reshape(2, 11, 6)
    expected.pow(2).sum().backward()
    want = [x.grad.clone()] + [p.grad.clone() for p in weights]
    x.grad = None
    mlp.zero_grad(set_to_none=True)

    torch.manual_seed(5)
    out = TiledMLP.apply(mlp.forward, 4, x, *weights)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.manual_seed(123)  # backward runs later, with the global generator elsewhere
    out.pow(2).sum().backward()
    for got, w in zip([x.grad] + [p.grad for p in weights], want):
        torch.testing.assert_close(got, w, rtol=0, atol=ATOL)


def test_deep_copy_runs_its_own_weights():
    model = _qwen()
    tile_mlps(model, 5)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for mlp in dense_mlps(twin):
            mlp.down_proj.weight.zero_()
    ids = torch.arange(20)[None]
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, twin(input_ids=ids).logits)


def test_the_fast_paired_step_with_tiled_mlps_matches_untiled():
    """The DPO fast step (packing, prefix sharing, chunked head, checkpointing) through load_policy with the key set."""
    speed = SpeedConfig(pack_length=64, logps_chunk_size=5)
    cfg = _cfg(speed, **{"train.gradient_checkpointing": True})
    plain_policy = _moved(load_policy(cfg)).train()
    reference = make_reference(plain_policy, cfg, needs_reference=True)
    batch = make_collate(speed)(_pairs(), 0)
    want = _run(forward_pairs_fast, plain_policy, reference, batch, cfg)
    tiled_cfg = _cfg(
        SpeedConfig(pack_length=64, logps_chunk_size=5, tiled_mlp=16), **{"train.gradient_checkpointing": True}
    )
    policy = _moved(load_policy(tiled_cfg)).train()
    assert len(dense_mlps(policy)) == 2 and all(hasattr(type(m), "_dpokit_base") for m in dense_mlps(policy))
    seen = _mlp_input_tokens(policy)
    got = _run(forward_pairs_fast, policy, reference, batch, tiled_cfg)
    assert batch["input_ids"].numel() > 16 and max(seen) <= 16
    torch.testing.assert_close(got[0].losses, want[0].losses, rtol=0, atol=ATOL)
    for name, g in want[2].items():
        torch.testing.assert_close(got[2][name], g, rtol=0, atol=ATOL, msg=name)


def test_negative_tile_is_refused_and_zero_is_off():
    model = _qwen()
    with pytest.raises(ConfigError, match="speed.tiled_mlp"):
        tile_mlps(model, -1)
    assert tile_mlps(model, 0) == 0 and not any(hasattr(type(m), "_dpokit_base") for m in model.modules())
    assert (
        load_config(None, {"model.name_or_path": str(tiny_model_dir()), "speed.tiled_mlp": 512}).speed.tiled_mlp == 512
    )
