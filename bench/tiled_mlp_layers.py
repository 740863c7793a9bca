"""The decoder layers alone, with and without speed.tiled_mlp: forward + backward peak RSS above the start, in process.

    python bench/tiled_mlp_layers.py 0 4000 1      # tile 0 (off), 4000 tokens, gradient checkpointing on
    python bench/tiled_mlp_layers.py 1024 4000 1   # 1024-token tiles

Two `long`-workload decoder layers (the Qwen2.5-0.5B layer shape, bench/workloads.py), a 1000-word vocabulary (no LM
head cost), one row of T tokens, loss = mean of the squared last hidden state. Two iterations; the second is measured
(a 2 ms RSS sampler), with the gradients already allocated, so the number is the layers' activations and transients.
"""

import sys
import threading
import time
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from workloads import LONG_CONTEXT
from dpokit.tiled_mlp import tile_mlps

tile, T, ckpt = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
torch.manual_seed(0)
dims = {**LONG_CONTEXT, "num_hidden_layers": 2}
m = Qwen2ForCausalLM(Qwen2Config(vocab_size=1000, use_sliding_window=False, **dims)).train()
if ckpt:
    m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
tile_mlps(m, tile)


def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20


peak = [0]
run = [True]


def s():
    while run[0]:
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)


ids = torch.randint(0, 1000, (1, T))
for it in range(2):
    m.zero_grad(set_to_none=False)
    before = rss()
    peak[0] = before
    if it == 1:
        th = threading.Thread(target=s)
        th.start()
    h = m.model(input_ids=ids).last_hidden_state
    h.pow(2).mean().backward()
run[0] = False
th.join()
print(f"tile={tile} T={T} ckpt={ckpt}: fwd+bwd peak above start {peak[0] - before:.0f} MiB")
