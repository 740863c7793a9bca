"""The shape of a decoder-only transformer from its config.json alone (no weights): what `dpokit plan` sizes.

Layer counts and widths under the names Llama, Qwen, Mistral and Gemma use (GPT-2/OPT aliases too),
mixture-of-experts layers (Mixtral, Qwen2/3-MoE, OLMoE), and the parameter counts that follow from them.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpokit.config import ConfigError


@dataclass(frozen=True)
class ModelShape:
    """What config.json says about a decoder-only transformer, mixture-of-experts layers included."""

    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    tied: bool
    gated: bool = True  # SwiGLU (gate, up, down) rather than a two-matrix MLP
    head_dim: int = 0  # 0: hidden // heads
    experts: int = 0  # routed experts per MoE layer (0: a dense model)
    experts_per_token: int = 0  # top-k
    expert_intermediate: int = 0  # one expert's MLP width
    shared_intermediate: int = 0  # Qwen2-MoE's shared expert (and its sigmoid gate); 0: none
    moe_layers: int = 0  # layers whose MLP is the experts; the others are dense
    extra_per_layer: int = 0  # attention biases, q/k norms

    kv_dim = property(lambda self: (self.head_dim or self.hidden // self.heads) * self.kv_heads)
    q_dim = property(lambda self: (self.head_dim or self.hidden // self.heads) * self.heads)

    @property
    def matrices(self) -> list[tuple[str, int, int, int, bool]]:
        """(name, in, out, copies in the model, is an nn.Linear) of every weight matrix of the decoder layers.

        The experts of transformers 5's MoE models are 3D parameters (`experts.gate_up_proj`, `experts.down_proj`),
        not linear modules: peft adapts them by name (models.expert_parameter_targets), NF4 leaves them as loaded.
        """
        h, q, kv, i, n = self.hidden, self.q_dim, self.kv_dim, self.intermediate, self.layers
        dense = n - self.moe_layers
        out = [
            ("q_proj", h, q, n, True),
            ("k_proj", h, kv, n, True),
            ("v_proj", h, kv, n, True),
            ("o_proj", q, h, n, True),
        ]
        mlp = (
            [("gate_proj", h, i, dense, True), ("up_proj", h, i, dense, True), ("down_proj", i, h, dense, True)]
            if self.gated
            else [("fc1", h, i, dense, True), ("fc2", i, h, dense, True)]
        )
        out += [m for m in mlp if m[3]]
        if self.moe_layers:
            e, s, m = self.expert_intermediate, self.shared_intermediate, self.moe_layers
            out += [("gate_up_proj", h, 2 * e, m * self.experts, False), ("down_proj", e, h, m * self.experts, False)]
            if s:
                out += [
                    ("gate_proj", h, s, m, True),
                    ("up_proj", h, s, m, True),
                    ("down_proj", s, h, m, True),
                    ("shared_expert_gate", h, 1, m, True),
                ]
        return out

    @property
    def linear_params(self) -> int:
        """Parameters of the decoder layers' linear modules (what NF4 quantises)."""
        return sum(a * b * c for _, a, b, c, linear in self.matrices if linear)

    layer_linear_params = property(
        lambda self: self.linear_params // self.layers
    )  # per layer (an MoE model's: the mean)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        norms = self.layers * 2 * self.hidden + self.hidden
        router = self.moe_layers * self.experts * self.hidden
        weights = sum(a * b * c for _, a, b, c, _ in self.matrices)
        return self.embedding_params + weights + router + norms + self.layers * self.extra_per_layer

    @property
    def active_params(self) -> int:
        """Parameters one token runs through: all but the experts the router does not pick for it."""
        idle = self.experts - self.experts_per_token
        return self.params - self.moe_layers * idle * 3 * self.hidden * self.expert_intermediate

    @property
    def mlp_activation_values(self) -> float:
        """Values an MLP keeps per token for backward, mean over the layers: 4 x a SwiGLU's width (gate, up, SiLU(gate),
        product); an MoE layer's top-k experts each that and their copy of the token, + router logits and probabilities."""
        dense = (4 if self.gated else 2) * self.intermediate
        if not self.moe_layers:
            return dense
        moe = (
            self.experts_per_token * (4 * self.expert_intermediate + self.hidden)
            + 4 * self.shared_intermediate
            + 2 * self.experts
        )
        return (dense * (self.layers - self.moe_layers) + moe * self.moe_layers) / self.layers


def _first(config: dict, *keys, default=None):
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if default is None:
        raise ConfigError(f"config.json has none of {', '.join(keys)}: dpokit plan cannot size this model")
    return default


def _moe_fields(config: dict, layers: int) -> dict:
    """The ModelShape fields of a mixture-of-experts config (Mixtral, Qwen2/3-MoE, OLMoE names); {} for a dense one."""
    experts = _first(config, "num_local_experts", "num_experts", "n_routed_experts", default=0)
    if not experts:
        return {}
    step, dense_only = config.get("decoder_sparse_step") or 1, set(config.get("mlp_only_layers") or ())
    moe_layers = sum(1 for i in range(layers) if i not in dense_only and (i + 1) % step == 0)
    return {
        "experts": experts,
        "experts_per_token": _first(config, "num_experts_per_tok"),
        "moe_layers": moe_layers,
        "expert_intermediate": _first(config, "moe_intermediate_size", "intermediate_size"),
        "shared_intermediate": config.get("shared_expert_intermediate_size") or 0,
    }


def model_shape(config: dict) -> ModelShape:
    """The shape from a config.json dict (Llama/Qwen/Mistral/Gemma names, GPT-2/OPT aliases, MoE layers)."""
    config = config.get("text_config", config)  # multimodal wrappers keep the decoder's config inside
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    heads = _first(config, "num_attention_heads", "n_head")
    kv_heads = _first(config, "num_key_value_heads", default=heads)
    layers = _first(config, "num_hidden_layers", "n_layer")
    head_dim = config.get("head_dim") or hidden // heads
    model_type = config.get("model_type", "")
    gated = model_type not in ("gpt2", "opt", "gpt_neox", "phi", "falcon", "bloom")
    extra = 0
    if config.get("attention_bias") or config.get("qkv_bias"):  # q, k, v biases (+ o's with attention_bias)
        extra += head_dim * (heads + 2 * kv_heads) + (hidden if config.get("attention_bias") else 0)
    if model_type in ("qwen3", "qwen3_moe"):  # RMSNorm of each query and key head
        extra += 2 * head_dim
    return ModelShape(
        vocab=_first(config, "vocab_size"),
        hidden=hidden,
        layers=layers,
        intermediate=_first(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden) or 4 * hidden,
        heads=heads,
        kv_heads=kv_heads,
        tied=bool(config.get("tie_word_embeddings", True)),
        gated=gated,
        head_dim=head_dim,
        extra_per_layer=extra,
        **_moe_fields(config, layers),
    )
