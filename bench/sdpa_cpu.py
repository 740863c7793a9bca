"""Which SDPA kernel runs on CPU for dpokit's packed causal rows, and whether its memory is linear in the sequence length.

    python bench/sdpa_cpu.py                      # lengths 2048,4096,8192; the Qwen2.5-0.5B attention shape (14 heads x 64)
    python bench/sdpa_cpu.py --masked 4096,12288  # the rejected branch's masked call alone: 4096 queries over 12288 keys

For each length T, in a fresh process: one attention call as dpokit's segment attention makes it
(packed_attention.segment_sdpa_forward): `is_causal=True` over a [prompt, chosen] run of T tokens, and the
rejected branch's call (T/4 queries over T/2 prompt + T/4 rejected keys, a bool bottom-right causal mask),
forward and backward in fp32. Printed: the aten kernel the profiler saw, and the highest RSS during
forward + backward above the RSS before it (a 1 ms sampler), against the size a materialised T x T score
matrix would have (heads x T^2 x 4 B).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time

HEADS, DIM = 14, 64


@contextlib.contextmanager
def _peak_rss():
    """Yields [bytes]: the peak RSS above the start while the block ran (sampled every millisecond), set at its end."""
    result, before, running = [0], _rss(), [True]
    peak = [before]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        yield result
    finally:
        running[0] = False
        thread.join()
        result[0] = peak[0] - before


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def measure(t: int) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, t, DIM, requires_grad=True) for _ in range(3))
    b, p = t // 4, t // 2
    qr, kr, vr = (torch.randn(1, HEADS, n, DIM, requires_grad=True) for n in (b, p + b, p + b))
    mask = torch.ones(b, p + b, dtype=torch.bool).tril(diagonal=p)
    with _peak_rss() as peak_above, profile(activities=[ProfilerActivity.CPU]) as prof:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.sum().backward()
        out_r = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask)
        out_r.sum().backward()
    kernels = sorted({e.key for e in prof.key_averages() if "attention" in e.key and e.key.startswith("aten::_")})
    return {
        "tokens": t,
        "kernels": kernels,
        "peak_above_mib": peak_above[0] / 2**20,
        "score_matrix_mib": HEADS * t * t * 4 / 2**20,
    }


def masked(b: int, keys: int) -> str:
    """One masked call (the rejected branch: b queries over keys - b prompt keys + b own), forward + backward: peak RSS."""
    import torch
    import torch.nn.functional as F

    q = torch.randn(1, HEADS, b, DIM, requires_grad=True)
    k, v = (torch.randn(1, HEADS, keys, DIM, requires_grad=True) for _ in range(2))
    mask = torch.ones(b, keys, dtype=torch.bool).tril(diagonal=keys - b)
    with _peak_rss() as peak_above:
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
    linear = (2 * b + 4 * keys) * HEADS * DIM * 4 / 2**20  # q, its gradient, k, v, their gradients
    return (
        f"{b} queries over {keys} keys: peak {peak_above[0] / 2**20:.0f} MiB above the start; q, k, v and their "
        f"gradients {linear:.0f} MiB; the mask {mask.numel() / 2**20:.0f} MiB as bool, {4 * mask.numel() / 2**20:.0f} as float"
    )


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--masked":
        print(masked(*(int(x) for x in sys.argv[2].split(","))))
        return 0
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print("SDPA " + json.dumps(measure(int(sys.argv[2]))), flush=True)
        return 0
    lengths = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "2048,4096,8192").split(",")]
    print(
        "| tokens | kernels | fwd+bwd peak above start MiB | a T x T fp32 score matrix would be MiB |\n|---:|---|---:|---:|"
    )
    for t in lengths:
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(t)], capture_output=True, text=True, check=True
        ).stdout
        r = json.loads(next(line for line in out.splitlines() if line.startswith("SDPA "))[5:])
        print(
            f"| {t} | {', '.join(r['kernels'])} | {r['peak_above_mib']:.0f} | {r['score_matrix_mib']:.0f} |", flush=True
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
