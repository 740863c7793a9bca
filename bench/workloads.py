"""Workloads of bench/dpo_vs_trl.py: lengths, vocabulary, model shape, and the memory arithmetic of a shape.

Tiny CPU workloads (a, b, c) and the GPU one (g) use a Llama of the dimensions below. The real-shape
workloads (q05, l1b) use the architecture, dimensions and vocabulary size of a released model, with
random weights (nothing is downloaded):

  q05  Qwen2.5-0.5B: Qwen2, hidden 896, 24 layers, 14 query / 2 KV heads, intermediate 4864,
       vocabulary 151,936, tied embeddings, q/k/v biases, rope theta 1e6
  l1b  Llama-3.2-1B: Llama, hidden 2048, 16 layers, 32 query / 8 KV heads, intermediate 8192,
       vocabulary 128,256, tied embeddings, llama3 rope scaling (factor 32, 8192 original positions)

Both: prompts 64-256 tokens, completions 32-192, 4 pairs a batch.
"""

from __future__ import annotations

CPU_MODEL = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 704,
}
GPU_MODEL = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "intermediate_size": 4096,
}
QWEN25_05B = {
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "tie_word_embeddings": True,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768,
    "hidden_act": "silu",
}
LLAMA32_1B = {
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "intermediate_size": 8192,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 131072,
    "hidden_act": "silu",
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}

LONG = {"prompt": (50, 600), "completion": (20, 400)}
# issue 22.2's long-context workload: the Qwen2.5-0.5B layer shape, 4 layers, a 32k vocabulary, pairs of 3k-6k tokens
LONG_CONTEXT = {**QWEN25_05B, "num_hidden_layers": 4, "max_position_embeddings": 131072}
REAL = {"prompt": (64, 256), "completion": (32, 192), "batch": 4}
WORKLOADS = {
    "a": {"vocab": 8192, "prompt": (64, 64), "completion": (64, 64), "desc": "short uniform pairs (64/64/64)"},
    "b": {"vocab": 8192, **LONG, "desc": "realistic: prompt 50-600, completions 20-400"},
    "c": {"vocab": 32000, **LONG, "desc": "b with a 32k vocabulary"},
    "g": {"vocab": 32000, **LONG, "desc": "GPU: ~0.5B Llama, bf16, b's lengths", "dims": GPU_MODEL},
    "q05": {
        "vocab": 151936,
        **REAL,
        "arch": "qwen2",
        "dims": QWEN25_05B,
        "desc": "Qwen2.5-0.5B shape (random weights), prompt 64-256, completions 32-192",
    },
    "long": {
        "vocab": 32000,
        "prompt": (2000, 3000),
        "completion": (500, 1500),
        "batch": 2,
        "arch": "qwen2",
        "dims": LONG_CONTEXT,
        "desc": "long context: Qwen2.5-0.5B layers x 4, 32k vocabulary, prompt 2k-3k, completions 0.5k-1.5k",
    },
    "l1b": {
        "vocab": 128256,
        **REAL,
        "arch": "llama",
        "dims": LLAMA32_1B,
        "desc": "Llama-3.2-1B shape (random weights), prompt 64-256, completions 32-192",
    },
}


def model_config(name: str, tokenizer, layers: int | None = None):
    """The transformers config of a workload's model (`layers` overrides the depth, for a quick reduced run)."""
    from transformers import LlamaConfig, Qwen2Config

    w = WORKLOADS[name]
    dims = dict(w.get("dims", CPU_MODEL))
    if layers is not None:
        dims["num_hidden_layers"] = layers
    dims.setdefault("max_position_embeddings", 2048)
    dims.setdefault("tie_word_embeddings", False)
    cls = Qwen2Config if w.get("arch") == "qwen2" else LlamaConfig
    extra = {"use_sliding_window": False} if cls is Qwen2Config else {}
    assert len(tokenizer) == w["vocab"], (len(tokenizer), w["vocab"])
    return cls(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
        **dims,
    )


def param_counts(config) -> dict:
    """Parameters of a Llama/Qwen2-style config: embedding, one decoder layer, final norm, untied head, total."""
    h, inter, v = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    bias = q + 2 * kv if config.model_type == "qwen2" else 0  # Qwen2: biases on q, k, v
    layer = h * q + 2 * h * kv + q * h + bias + 3 * h * inter + 2 * h  # attention, MLP, two RMSNorms
    embed = v * h
    head = 0 if config.tie_word_embeddings else v * h
    total = embed + config.num_hidden_layers * layer + h + head
    return {"embed": embed, "layer": layer, "layers": config.num_hidden_layers, "head": head, "total": total}


def memory_floor(config, bytes_per_param: int = 4) -> dict:
    """Bytes of weights, gradients and AdamW state (exp_avg + exp_avg_sq) of a full fine-tune, and a reference copy."""
    n = param_counts(config)["total"]
    w = n * bytes_per_param
    return {"params": n, "weights": w, "grads": w, "adamw": 2 * w, "reference": w, "floor": 4 * w}
