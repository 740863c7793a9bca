"""FlexAttention (attn_implementation="flex_attention"): the fast step's BlockMask path gives the plain step's numbers.

transformers compiles `flex_attention` (torch.compile) on first use. On CPU, torch 2.13 runs its
forward but has no backward ("FlexAttention does not support backward on CPU"), so here the loss,
log-probs and metrics are compared under no_grad, the BlockMask's rule is compared with the dense
mask of the eager path element by element (the eager path's gradients equal the plain step's,
tests/test_fast_paths.py), and the gradient comparison runs on a GPU only. A second row width in
one process makes dynamo recompile with dynamic shapes, whose CPU C++ kernel fails to build in
torch 2.13, so the compiled state is reset before each layout.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from dpokit.config import SpeedConfig
from dpokit.data.collate import collate_pairs
from dpokit.data.packing import Layout, collate_packed
from dpokit.data.tokenization import TokenizedPair
from dpokit.models import load_policy
from dpokit.packed_attention import flex_block_mask, allowed
from dpokit.reference import make_reference
from dpokit.steps.base import StepContext
from dpokit.steps.paired import forward_pairs, forward_pairs_fast, make_collate
from test_fast_paths import ATOL, _cfg, _compare, _moved, _pairs, _run

LAYOUTS = {
    "prefix_sharing": SpeedConfig(packing=True, prefix_sharing=True, pack_length=64, logps_chunk_size=5),
    "no_prefix_sharing": SpeedConfig(packing=True, prefix_sharing=False, pack_length=64, logps_chunk_size=5),
}


@pytest.fixture(scope="module")
def models():
    cfg = _cfg()
    policy = load_policy(cfg)
    reference = make_reference(policy, cfg, needs_reference=True)
    return _moved(policy), reference


def _flex_policy(policy):
    flex = load_policy(_cfg(**{"model.attn_implementation": "flex_attention"}))
    flex.load_state_dict(policy.state_dict())
    return flex


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_flex_forward_matches_the_plain_step(models, name):
    policy, reference = models
    speed = LAYOUTS[name]
    torch.compiler.reset()
    with torch.no_grad():
        out0, m0 = forward_pairs(policy, reference, collate_pairs(_pairs(), 0), StepContext(_cfg()))
        batch = make_collate(speed, "flex_attention")(_pairs(), 0)
        out1, m1 = forward_pairs_fast(_flex_policy(policy), reference, batch, StepContext(_cfg(speed)))
    assert batch["input_ids"].shape[0] > 1  # several packed rows: the BlockMask has a batch dimension
    torch.testing.assert_close(out1.losses, out0.losses, rtol=0, atol=ATOL)
    assert m0.keys() == m1.keys()
    for key, values in m0.items():
        torch.testing.assert_close(m1[key], values, rtol=1e-5, atol=ATOL, msg=key)
    assert m0["kl/chosen"].abs().max() > 1e-4


def test_speed_attention_flex_switches_a_default_model_to_flex(models):
    """speed.attention=flex with model.attn_implementation unset: the sdpa-loaded model runs the BlockMask path."""
    policy, reference = models
    speed = SpeedConfig(packing=True, prefix_sharing=True, pack_length=64, attention="flex")
    fresh = load_policy(_cfg())
    fresh.load_state_dict(policy.state_dict())
    torch.compiler.reset()
    with torch.no_grad():
        out0, _ = forward_pairs(policy, reference, collate_pairs(_pairs(), 0), StepContext(_cfg()))
        out1, _ = forward_pairs_fast(
            fresh, reference, make_collate(speed, "flex_attention")(_pairs(), 0), StepContext(_cfg(speed))
        )
    assert fresh.config._attn_implementation == "flex_attention"
    torch.testing.assert_close(out1.losses, out0.losses, rtol=0, atol=ATOL)


@pytest.mark.parametrize("prefix_sharing", [True, False])
def test_block_mask_rule_equals_the_dense_rule(prefix_sharing):
    """The BlockMask's mask_mod, evaluated at every (row, q, k), is `allowed` exactly: units, branches, padding."""
    pairs = [
        TokenizedPair([5, 6, 7], [8, 9], [10, 11, 12]),
        TokenizedPair([], [13], [14, 15]),
        TokenizedPair([16], [17, 18, 19], [20]),
    ]
    b = collate_packed(pairs, 0, Layout(packing=True, prefix_sharing=prefix_sharing, pack_length=12))
    rows, width = b["segment_ids"].shape
    assert rows > 1 and (b["segment_ids"] == -1).any()  # several rows, with padding
    block = flex_block_mask(b["segment_ids"], b["branch"])
    dense = create_mask(block.mask_mod, rows, 1, width, width, device="cpu")
    assert torch.equal(dense, allowed(b["segment_ids"], b["branch"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no backward on CPU (torch 2.13)")
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_flex_gradients_match_the_plain_step_on_gpu(models, name):
    policy, reference = (m.cuda() for m in models)
    speed = LAYOUTS[name]
    plain = _run(forward_pairs, policy, reference, {k: v.cuda() for k, v in collate_pairs(_pairs(), 0).items()}, _cfg())
    batch = {k: v.cuda() for k, v in make_collate(speed, "flex_attention")(_pairs(), 0).items()}
    _compare(plain, _run(forward_pairs_fast, _flex_policy(policy).cuda(), reference, batch, _cfg(speed)))
