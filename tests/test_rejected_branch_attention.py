"""The rejected branch's attention (packed_attention.rejected_branch_sdpa) equals the dense rule, in linear memory.

Outputs and q, k, v gradients of `segment_sdpa_forward` against SDPA with the dense `allowed()` mask, for units
with and without a prompt, with one rejected token or none, on MHA and GQA; and the memory: nothing of size
rejected x (prompt + rejected) is allocated or kept for the backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dpokit.packed_attention import allowed, rejected_branch_sdpa, segment_sdpa_forward

# (start, prompt, first, second) per unit of a row; second 0 is a plain sequence (or a pair without a rejected run)
ROWS = [
    [(0, 5, 3, 4), (12, 0, 2, 3), (17, 4, 3, 0), (24, 3, 2, 1)],  # p=0, b=0, b=1; padding at 30..33
    [(2, 9, 1, 7), (19, 1, 1, 1), (22, 4, 3, 5)],  # padding first, a long rejected run, p=1, the row full
]
WIDTH = 34


def _dense_inputs():
    """units, segment_ids, branch for ROWS, as data/packing.collate_packed lays them out."""
    segment_ids = torch.full((len(ROWS), WIDTH), -1)
    branch = torch.zeros((len(ROWS), WIDTH), dtype=torch.int8)
    units = []
    for r, row in enumerate(ROWS):
        for start, p, a, b in row:
            segment_ids[r, start : start + p + a + b] = len(units)
            if b:
                branch[r, start + p : start + p + a] = 1
                branch[r, start + p + a : start + p + a + b] = 2
            units.append((r, start, p, a, b))
    return tuple(units), segment_ids, branch


def _attend(fn, q, k, v, grad):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # MHA, and GQA with 2 and 4 query heads per key/value head
def test_segment_attention_equals_the_dense_rule(kv_heads):
    units, segment_ids, branch = _dense_inputs()
    module = torch.nn.Module()
    module.num_key_value_groups = 4 // kv_heads
    torch.manual_seed(0)
    q = torch.randn(len(ROWS), 4, WIDTH, 8, dtype=torch.float64)
    k, v = (torch.randn(len(ROWS), kv_heads, WIDTH, 8, dtype=torch.float64) for _ in range(2))
    real = (segment_ids >= 0)[:, :, None, None]  # padding outputs are never read: no gradient flows into them
    grad = torch.randn(len(ROWS), WIDTH, 4, 8, dtype=torch.float64) * real
    mask = allowed(segment_ids, branch)

    def dense(q, k, v):
        k, v = (t.repeat_interleave(4 // kv_heads, dim=1) for t in (k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3).transpose(1, 2)

    def segments(q, k, v):
        return segment_sdpa_forward(module, q, k, v, None, scaling=0.3, dpokit_units=units)[0]

    want, got = _attend(dense, q, k, v, grad), _attend(segments, q, k, v, grad)
    torch.testing.assert_close(got[0] * real, want[0] * real, rtol=0, atol=1e-12)
    for name, g, w in zip("qkv", got[1:], want[1:]):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12, msg=lambda m, n=name: f"d{n}: {m}")


# p = 0 (no prompt), b = 1, a prompt far longer than the branch and the reverse, and sizes past the CPU flash
# kernel's blocks (queries split by up to 256, keys by 512)
@pytest.mark.parametrize("p,b", [(0, 1), (0, 9), (7, 1), (13, 9), (3, 40), (700, 300), (90, 600)])
def test_rejected_branch_equals_the_bottom_right_causal_mask(p, b):
    torch.manual_seed(p * 1000 + b)
    q = torch.randn(1, 2, b, 16)
    k, v = (torch.randn(1, 2, p + b, 16) for _ in range(2))  # the prompt's p keys, then the branch's b
    grad = torch.randn(1, 2, b, 16)
    dense_mask = torch.ones(b, p + b, dtype=torch.bool).tril(diagonal=p)
    want = _attend(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask), q, k, v, grad)

    def linear(q, k, v):
        return rejected_branch_sdpa(q, k[:, :, p:], v[:, :, p:], k[:, :, :p], v[:, :, :p])

    got = _attend(linear, q, k, v, grad)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_rejected_branch_with_no_rejected_token():
    q, k = torch.randn(1, 2, 0, 8), torch.randn(1, 2, 5, 8)
    assert rejected_branch_sdpa(q, q, q, k, k).shape == (1, 2, 0, 8)


def test_rejected_branch_memory_is_linear_in_the_length():
    """2048 rejected queries over 4096 prompt + 2048 rejected keys: a dense mask would be 12 MiB as bool and 48 MiB
    as float; no allocation and no tensor saved for the backward comes near that (q, k, v are 24-48 KiB each)."""
    p, b = 4096, 2048
    q, k, v = (torch.randn(1, 1, b, 4, requires_grad=True) for _ in range(3))
    prompt_k, prompt_v = (torch.randn(1, 1, p, 4, requires_grad=True) for _ in range(2))
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().nbytes())
        return t

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = rejected_branch_sdpa(q, k, v, prompt_k, prompt_v)
        out.sum().backward()
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert max(saved) < 2**20 and biggest < 4 * 2**20, (max(saved), biggest)
