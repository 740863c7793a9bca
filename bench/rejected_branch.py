"""The rejected branch's attention (prefix sharing): peak memory and time of forward + backward, dense mask vs linear.

    python bench/rejected_branch.py                                  # p = 2048,4096,8192 x b = 512,1024,2048,4096
    python bench/rejected_branch.py --prompt 8192 --rejected 4096 --methods dense,linear,causal

b rejected queries over p prompt keys + b rejected keys (Qwen2.5-0.5B heads, 14 x 64, fp32, one CPU thread), as
packed_attention.segment_sdpa_forward computes a [prompt, chosen, rejected] unit's rejected run. Methods:
  dense   the rule before: a (b, p + b) bool mask, tril(diagonal=p), passed to SDPA (which makes it an additive
          float mask on CPU and keeps it for the backward)
  linear  packed_attention.rejected_branch_sdpa: the rejected keys reversed and first, and the mask a (1, 1)-strided
          view of a 2b + p vector
  causal  an alternative not taken: is_causal SDPA over queries [prompt, rejected], keys [prompt, rejected],
          keeping the last b outputs (exact, linear, but the prompt's p^2/2 extra scores)
Each (method, p, b) runs in a fresh process, with glibc told to map blocks of 64 KiB and more on their own
(MALLOC_MMAP_THRESHOLD_, so that freed tensors leave the RSS at once): the peak is the process's highest RSS
(ru_maxrss) during the first forward + backward above its RSS just before it (inputs made, kernels and autograd
warmed by an untimed call on 32 + 32 tokens); the time is the fastest of --repeats forward + backward calls.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HEADS, DIM = 14, 64


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _attention(method: str):
    """method -> f(q, k, v, prompt_q, prompt_k, prompt_v): the rejected run's (b) and its prompt's (p) tensors."""
    import torch
    import torch.nn.functional as F

    from dpokit.packed_attention import rejected_branch_sdpa

    def dense(q, k, v, pq, pk, pv):  # as segment_sdpa_forward did: keys = prompt + rejected, a dense bool mask
        b, p = q.shape[-2], pk.shape[-2]
        mask = torch.ones(b, p + b, dtype=torch.bool).tril(diagonal=p)
        return F.scaled_dot_product_attention(q, torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2), attn_mask=mask)

    def linear(q, k, v, pq, pk, pv):
        return rejected_branch_sdpa(q, k, v, pk, pv)

    def causal(q, k, v, pq, pk, pv):
        q, k, v = (torch.cat(pair, dim=2) for pair in ((pq, q), (pk, k), (pv, v)))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)[:, :, pq.shape[2] :]

    return {"dense": dense, "linear": linear, "causal": causal}[method]


def measure(method: str, p: int, b: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(1)
    attention = _attention(method)
    torch.manual_seed(0)
    branch = [torch.randn(1, HEADS, b, DIM, requires_grad=True) for _ in range(3)]
    prompt = [torch.randn(1, HEADS, p, DIM, requires_grad=True) for _ in range(3)]
    grad = torch.randn(1, HEADS, b, DIM)
    # warm the kernels and autograd (the first backward with a given gradient imports some 30 MiB of Python)
    attention(*(t[:, :, :32] for t in branch + prompt)).backward(grad[:, :, :32])
    times = []
    for t in branch + prompt:
        t.grad = None  # full-size gradients made by the warm-up call: freed before the start is read
    before, peak_before = _rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(repeats):
        for t in branch + prompt:
            t.grad = None
        start = time.perf_counter()
        attention(*branch, *prompt).backward(grad)
        times.append(time.perf_counter() - start)
        if len(times) == 1:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # the peak counts only if the first call set it (else it was reached before, and the number would be too low)
    return {
        "method": method,
        "p": p,
        "b": b,
        "seconds": min(times),
        "peak_mib": (peak - before) / 2**20 if peak > peak_before else None,
    }


def _child(method: str, p: int, b: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--child", method, str(p), str(b), str(repeats)]
    # glibc maps every block of 64 KiB or more on its own and unmaps it when freed, so RSS follows the live tensors
    # (by default it raises that threshold as blocks are freed and keeps freed memory for reuse, hiding peaks)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RB "))[3:])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        method, p, b, repeats = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        print("RB " + json.dumps(measure(method, p, b, repeats)), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", default="2048,4096,8192", help="prompt lengths p")
    parser.add_argument("--rejected", default="512,1024,2048,4096", help="rejected lengths b")
    parser.add_argument("--methods", default="dense,linear", help="dense, linear, causal")
    parser.add_argument("--repeats", type=int, default=2, help="forward + backward calls timed per run (the fastest)")
    args = parser.parse_args()
    methods = args.methods.split(",")
    head = " | ".join(f"{m} MiB" for m in methods) + " | " + " | ".join(f"{m} s" for m in methods)
    print(f"| p | b | {head} | the float mask, MiB |\n|" + "---:|" * (2 * len(methods) + 3))
    for p in (int(x) for x in args.prompt.split(",")):
        for b in (int(x) for x in args.rejected.split(",")):
            runs = [_child(m, p, b, args.repeats) for m in methods]
            mib = " | ".join("?" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}" for r in runs)
            secs = " | ".join(f"{r['seconds']:.2f}" for r in runs)
            print(f"| {p} | {b} | {mib} | {secs} | {4 * b * (p + b) / 2**20:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
