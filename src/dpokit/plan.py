"""`dpokit plan CONFIG`: the peak memory a training run will need per GPU, part by part, before loading anything.

Reads the model's config.json only (no weights) and the run's settings, and counts bytes:

    weights      parameters x bytes of model.dtype; QLoRA: the decoder's linear layers at 4.127 bits
                 (NF4 + double-quantised scales), embeddings and norms as loaded; + LoRA adapters in float32.
                 A mixture-of-experts model holds every expert (the note gives the parameters active per token:
                 top-k of the experts); its 3D expert weights are not linear modules, so NF4 leaves them as loaded
    gradients    trainable parameters x their bytes
    optimizer    trainable parameters x 2 moments in their dtype (AdamW) or ~2.03 bytes (adamw_8bit)
    reference    a live copy (model.ref_dtype or model.dtype); 0 with LoRA (adapters off), with the
                 reference cache (speed.ref_cache: the log-probs are on disk) and for reference-free losses;
                 a moving reference (loss.ref_sync_steps) is always live, under LoRA a merged copy in model.dtype
    activations  what autograd keeps for backward, per token of a micro-batch; with gradient
                 checkpointing each layer's input plus one layer recomputed in full
    backward     the embedding's and LM head's weight gradients, each computed whole before being added to
                 .grad (full fine-tuning only): 2 x vocabulary x hidden x 4 bytes
    step         the optimizer step's temporaries: none for the fused AdamW (optim.fused, the default) and
                 adamw_8bit; the for-each AdamW (optim.fused=false, or sharded) holds one float32 copy of every
                 trainable parameter on GPU (the sqrt of the second moment), on CPU per tensor two of the largest
    logits       the LM head: chunks of speed.logps_chunk_size tokens (chunked head), the completion
                 tokens x vocabulary (fast path without it), or every row position x vocabulary (plain path)

Tokens of a micro-batch: train.batch_size pairs that fill data.max_length on both sides (the worst
case: a short prompt and completions cut at max_length), so 2 x max_length per pair. Under FSDP or
ZeRO-3 (--gpus N > 1) weights, gradients, optimizer state and a live reference are sharded by N
(not with a moving reference, loss.ref_sync_steps, which runs under DDP only);
activations and logits are not. A runtime allowance (CUDA context and allocator slack) is added per GPU.
The peak is the sum of all parts: an allocator keeps the blocks freed after backward (PyTorch's
caching allocator on GPU, glibc's heap on CPU), so the phases' transients add up rather than alternate.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dpokit.config import Config, ConfigError
from dpokit.logprobs import auto_chunk_size
from dpokit.losses import needs_reference
from dpokit.optimizers import optimizer_state_bytes_per_param

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}  # "auto": most checkpoints are half precision
NF4_BYTES = 4.127 / 8  # 4-bit codes + an 8-bit scale per 64 weights + a float32 per 256 scales (double quantisation)
RUNTIME_BYTES = int(0.75 * GIB)  # CUDA context, cuBLAS workspace, allocator fragmentation


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
        out = [("q_proj", h, q, n, True), ("k_proj", h, kv, n, True), ("v_proj", h, kv, n, True), ("o_proj", q, h, n, True)]
        mlp = [("gate_proj", h, i, dense, True), ("up_proj", h, i, dense, True), ("down_proj", i, h, dense, True)] if self.gated \
            else [("fc1", h, i, dense, True), ("fc2", i, h, dense, True)]
        out += [m for m in mlp if m[3]]
        if self.moe_layers:
            e, s, m = self.expert_intermediate, self.shared_intermediate, self.moe_layers
            out += [("gate_up_proj", h, 2 * e, m * self.experts, False), ("down_proj", e, h, m * self.experts, False)]
            if s:
                out += [("gate_proj", h, s, m, True), ("up_proj", h, s, m, True), ("down_proj", s, h, m, True),
                        ("shared_expert_gate", h, 1, m, True)]
        return out

    @property
    def linear_params(self) -> int:
        """Parameters of the decoder layers' linear modules (what NF4 quantises)."""
        return sum(a * b * c for _, a, b, c, linear in self.matrices if linear)

    layer_linear_params = property(lambda self: self.linear_params // self.layers)  # per layer (an MoE model's: the mean)

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
        moe = self.experts_per_token * (4 * self.expert_intermediate + self.hidden) + 4 * self.shared_intermediate + 2 * self.experts
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
    return {"experts": experts, "experts_per_token": _first(config, "num_experts_per_tok"), "moe_layers": moe_layers,
            "expert_intermediate": _first(config, "moe_intermediate_size", "intermediate_size"),
            "shared_intermediate": config.get("shared_expert_intermediate_size") or 0}


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
        vocab=_first(config, "vocab_size"), hidden=hidden, layers=layers,
        intermediate=_first(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden) or 4 * hidden,
        heads=heads, kv_heads=kv_heads, tied=bool(config.get("tie_word_embeddings", True)), gated=gated,
        head_dim=head_dim, extra_per_layer=extra, **_moe_fields(config, layers),
    )


def read_model_shape(name_or_path: str, revision: Optional[str] = None) -> ModelShape:
    """config.json of a local folder, or of a hub id (downloads that one file, never the weights)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        file = path / "config.json"
    else:
        try:
            from huggingface_hub import hf_hub_download

            file = Path(hf_hub_download(name_or_path, "config.json", revision=revision))
        except Exception as e:  # noqa: BLE001 - any failure to find the file is the user's to fix
            raise ConfigError(f"model.name_or_path={name_or_path!r}: no config.json found ({type(e).__name__}: {e})") from None
    try:
        return model_shape(json.loads(file.read_text()))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{file}: not a readable config.json: {e}") from None


@dataclass
class Part:
    name: str
    bytes: float
    note: str = ""


@dataclass
class Plan:
    parts: list[Part]
    gpus: int
    gpu_memory: Optional[float]  # bytes per GPU, None when not given
    device: str = "cuda"

    @property
    def total(self) -> float:
        return sum(p.bytes for p in self.parts)

    @property
    def fits(self) -> Optional[bool]:
        return None if self.gpu_memory is None else self.total <= self.gpu_memory

    def part(self, name: str) -> float:
        return sum(p.bytes for p in self.parts if p.name == name)


def _lora_matrices(cfg: Config, shape: ModelShape) -> list[tuple[str, int, int, int, bool]]:
    """The decoder's weight matrices lora.target_modules adapts: all-linear, the linear modules (not the experts' 3D
    weights, which only named targets reach: `gate_up_proj`, `down_proj`); other names: every linear (an upper bound)."""
    targets = cfg.lora.target_modules
    linears = [m for m in shape.matrices if m[4]]
    if targets == "all-linear":
        return linears
    named = [m for m in shape.matrices if m[0] in (targets if isinstance(targets, list) else [targets])]
    return named or linears


def _lora_params(cfg: Config, shape: ModelShape) -> int:
    """Adapter parameters: r x (in + out) per targeted matrix (an expert's too) of every decoder layer."""
    return sum(cfg.lora.r * (a + b) * copies for _, a, b, copies, _ in _lora_matrices(cfg, shape))


def _activation_bytes_per_token(cfg: Config, shape: ModelShape) -> tuple[float, float]:
    """(kept per token over all layers, one layer recomputed in full) in bytes.

    A Llama-style layer keeps, per token, about 10 x hidden (two RMSNorms in float32 keep their input and
    normalised output; q, k, v before and after the rotary embedding; the attention output) + 4 x kv
    + 4 x intermediate (gate, up, SiLU(gate) and their product) values for backward; an MoE layer the
    same for each of its top-k experts (`ModelShape.mlp_activation_values`).
    """
    compute = 2 if cfg.train.mixed_precision in ("bf16", "fp16") else DTYPE_BYTES[cfg.model.dtype]
    h, kv = shape.hidden, shape.kv_dim
    layer = (10 * h + 4 * kv + shape.mlp_activation_values) * compute
    if cfg.train.gradient_checkpointing:
        return shape.layers * h * compute, 2 * layer  # each layer's input; one layer and its gradients in backward
    return shape.layers * layer, 0.0


def _moving_reference(cfg: Config) -> bool:
    """TR-DPO (loss.ref_sync_steps): a live reference under DDP only (FSDP/DeepSpeed are refused, training.ref_sync),
    never cached (training.setup turns the cache off) and never on a 4-bit base (config.validate)."""
    return cfg.loss.ref_sync_steps > 0 and needs_reference(cfg.loss)


def _weights_note(cfg: Config, shape: ModelShape) -> str:
    moe = f" ({shape.active_params / 1e6:.0f}M active per token: {shape.experts_per_token} of {shape.experts} experts)"
    nf4 = ", linears in NF4" if cfg.model.quantization == "nf4" else ""
    return f"{shape.params / 1e6:.0f}M parameters in {cfg.model.dtype}" + nf4 + (moe if shape.experts else "")


def _reference_part(cfg: Config, shape: ModelShape, shard: int, moving: bool) -> Part:
    """The reference's bytes per GPU. A moving reference is always a live copy, under LoRA a merged copy of the whole
    model (the adapters-off base cannot move); model.ref_dtype is refused with LoRA, so the copy's dtype is ref_dtype
    or dtype either way."""
    live_reference = needs_reference(cfg.loss) and (moving or (not cfg.lora.enabled and not cfg.speed.ref_cache))
    ref_dtype = cfg.model.ref_dtype or cfg.model.dtype
    ref_bytes = shape.params * DTYPE_BYTES[ref_dtype] / shard if live_reference else 0.0
    ref_note = ((f"moving reference (loss.ref_sync_steps): {'merged ' if cfg.lora.enabled else ''}live copy in {ref_dtype}"
                 if moving else "live copy in " + ref_dtype) if live_reference else (
        "none (reference-free loss)" if not needs_reference(cfg.loss) else
        "adapters off: no copy" if cfg.lora.enabled else "reference cache on disk: no model"))
    return Part("reference", ref_bytes, ref_note)


def plan_memory(cfg: Config, shape: ModelShape, gpus: int = 1, gpu_memory: Optional[float] = None,
                runtime: float = RUNTIME_BYTES, device: str = "cuda") -> Plan:
    """Peak bytes per GPU, part by part (see the module docstring for what each part counts).

    device="cpu" predicts a CPU run's growth of resident memory (tests check it against measured peak RSS):
    no runtime allowance is implied by it, and the optimizer step works tensor by tensor.
    """
    wbytes = DTYPE_BYTES[cfg.model.dtype]
    qlora = cfg.model.quantization == "nf4"
    linear = shape.linear_params
    other = shape.params - linear
    weights = (linear * NF4_BYTES + other * wbytes) if qlora else shape.params * wbytes
    trainable = shape.params
    notes = {"weights": _weights_note(cfg, shape)}
    if cfg.lora.enabled:
        trainable = _lora_params(cfg, shape)
        weights += trainable * 4
        notes["weights"] += f" + {trainable / 1e6:.1f}M LoRA"
    grad_bytes = 4 if cfg.lora.enabled else wbytes  # peft keeps adapters in float32 under a half-precision base
    moving = _moving_reference(cfg)
    shard = gpus if gpus > 1 and not moving else 1  # FSDP full shard / ZeRO-3; a moving reference: DDP, every GPU holds all
    parts = [
        Part("weights", weights / shard, notes["weights"]),
        Part("gradients", trainable * grad_bytes / shard, f"{trainable / 1e6:.1f}M trainable"),
        Part("optimizer", trainable * optimizer_state_bytes_per_param(cfg.optim.name, grad_bytes) / shard, cfg.optim.name),
    ]
    parts.append(_reference_part(cfg, shape, shard, moving))
    tokens = cfg.train.batch_size * 2 * cfg.data.max_length  # (2B, T) worst case: both rows fill max_length
    kept, recompute = _activation_bytes_per_token(cfg, shape)
    ckpt = "on" if cfg.train.gradient_checkpointing else "off"
    parts.append(Part("activations", tokens * (kept + recompute), f"{tokens} tokens, gradient checkpointing {ckpt}"))
    fast = cfg.speed.packing or cfg.speed.prefix_sharing or cfg.speed.chunked_logps or cfg.speed.ref_cache
    completion = tokens  # worst case again: (almost) every token is a completion token
    if fast and cfg.speed.chunked_logps:
        chunk = min(auto_chunk_size(shape.vocab, cfg.speed.logps_chunk_size), completion)
        logits, head = 3 * chunk * shape.vocab * 4, f"chunked head: {chunk} tokens x {shape.vocab}"
    elif fast:
        logits, head = 3 * completion * shape.vocab * 4, f"{completion} completion tokens x {shape.vocab}"
    else:
        logits, head = 3 * tokens * shape.vocab * 4, f"every position: {tokens} x {shape.vocab}"
    parts.append(Part("logits", logits, head + " (float32 logits, log-softmax, gradient)"))
    if not cfg.lora.enabled:
        parts.append(Part("backward", 2 * shape.vocab * shape.hidden * grad_bytes / shard, "embedding and LM-head gradients before accumulation"))
    fused = cfg.optim.fused and shard == 1  # optimizers.build_optimizer: for-each under FSDP / ZeRO-3
    if cfg.optim.name != "adamw" or fused:
        pass  # the fused kernel (and AdamW8bit) update in place: no temporaries
    elif device == "cpu":
        largest = shape.vocab * shape.hidden if not cfg.lora.enabled else max(cfg.lora.r * (a + b) for _, a, b, _, _ in _lora_matrices(cfg, shape))
        parts.append(Part("step", 2 * largest * 4, "optimizer temporaries of the largest tensor (per-tensor AdamW on CPU)"))
    else:
        parts.append(Part("step", trainable * grad_bytes / shard, "foreach AdamW: a temporary of every trainable parameter"))
    if runtime:
        parts.append(Part("runtime", runtime, "CUDA context, workspaces, allocator slack"))
    return Plan(parts, gpus, gpu_memory, device)


def suggestions(cfg: Config, shape: ModelShape, plan: Plan) -> list[tuple[str, float, bool]]:
    """(change, bytes saved per GPU, fits after it) for every single change that lowers the peak, biggest saving first."""
    changes: dict[str, Config] = {}

    def change(text: str, **sections):
        changes[text] = dataclasses.replace(cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()})

    if not cfg.train.gradient_checkpointing:
        change("train.gradient_checkpointing=true", train={"gradient_checkpointing": True})
    if not cfg.speed.chunked_logps:
        change("speed.chunked_logps=true", speed={"chunked_logps": True})
    moving = _moving_reference(cfg)
    if not cfg.speed.ref_cache and needs_reference(cfg.loss) and not cfg.lora.enabled and not moving:
        change("speed.ref_cache=true", speed={"ref_cache": True})
        if not cfg.model.ref_dtype and cfg.model.dtype == "float32":
            change("model.ref_dtype=bfloat16", model={"ref_dtype": "bfloat16"})
    if cfg.model.dtype == "float32":
        change("model.dtype=bfloat16", model={"dtype": "bfloat16"})
    if cfg.optim.name == "adamw":
        change("optim.name=adamw_8bit", optim={"name": "adamw_8bit"})
    if not cfg.lora.enabled:
        change("lora.enabled=true", lora={"enabled": True})
    if cfg.model.quantization == "none" and not moving:
        change("lora.enabled=true model.quantization=nf4 (QLoRA)", lora={"enabled": True}, model={"quantization": "nf4"})
    if cfg.train.batch_size > 1:
        half = cfg.train.batch_size // 2
        change(f"train.batch_size={half} train.grad_accum={cfg.train.grad_accum * cfg.train.batch_size // half}",
               train={"batch_size": half, "grad_accum": cfg.train.grad_accum * cfg.train.batch_size // half})
    runtime = plan.part("runtime")
    out = []
    for text, changed in changes.items():
        after = plan_memory(changed, shape, plan.gpus, plan.gpu_memory, runtime, plan.device)
        if after.total < plan.total:
            out.append((text, plan.total - after.total, bool(after.fits)))
    for gpus in (2, 4, 8) if not moving else ():  # a moving reference refuses FSDP/DeepSpeed (training.ref_sync)
        if gpus > plan.gpus:
            after = plan_memory(cfg, shape, gpus, plan.gpu_memory, runtime, plan.device)
            out.append((f"--gpus {gpus} with FSDP/ZeRO-3 (shards weights, gradients, optimizer)", plan.total - after.total, bool(after.fits)))
            break
    return sorted(out, key=lambda s: -s[1])


def parse_size(text: str) -> float:
    """'80GB', '80GiB', '24G', '512MB' -> bytes (GB and G are taken as GiB, as GPU makers' 80 GB means)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"--gpu-memory {text!r}: expected a size like 80GB or 24GiB")
    return float(m.group(1)) * 1024 ** "BKMGT".index((m.group(2) or "B").upper())


def format_plan(cfg: Config, plan: Plan, tips: list[tuple[str, float, bool]]) -> str:
    how = "DDP: a moving reference (loss.ref_sync_steps) is not sharded" if _moving_reference(cfg) else "FSDP/ZeRO-3 sharding"
    per = "per GPU" + (f" ({plan.gpus} GPUs, {how})" if plan.gpus > 1 else "")
    lines = [f"dpokit plan: {cfg.model.name_or_path}, batch {cfg.train.batch_size} x {cfg.data.max_length} tokens, {per}"]
    for p in plan.parts:
        lines.append(f"  {p.name:<12} {p.bytes / GIB:8.2f} GiB  {p.note}")
    lines.append(f"  {'peak':<12} {plan.total / GIB:8.2f} GiB")
    if plan.fits is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"{verdict} in {plan.gpu_memory / GIB:.0f} GiB per GPU")
    if tips and plan.fits is not True:
        lines.append("to lower the peak (one change each, biggest saving first):")
        for text, saved, fits in tips:
            lines.append(f"  {text:<60} -{saved / GIB:.2f} GiB" + ("  (then fits)" if fits and plan.fits is False else ""))
    return "\n".join(lines)
