"""`dpokit plan CONFIG`: the peak memory a training run will need per GPU, part by part, before loading anything.

Reads the model's config.json only (no weights; model_shape.py) and the run's settings, and counts bytes:

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
from dpokit.model_shape import ModelShape, model_shape
from dpokit.optimizers import optimizer_state_bytes_per_param

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}  # "auto": most checkpoints are half precision
NF4_BYTES = 4.127 / 8  # 4-bit codes + an 8-bit scale per 64 weights + a float32 per 256 scales (double quantisation)
RUNTIME_BYTES = int(0.75 * GIB)  # CUDA context, cuBLAS workspace, allocator fragmentation


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
            raise ConfigError(
                f"model.name_or_path={name_or_path!r}: no config.json found ({type(e).__name__}: {e})"
            ) from None
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
    ref_note = (
        (
            f"moving reference (loss.ref_sync_steps): {'merged ' if cfg.lora.enabled else ''}live copy in {ref_dtype}"
            if moving
            else "live copy in " + ref_dtype
        )
        if live_reference
        else (
            "none (reference-free loss)"
            if not needs_reference(cfg.loss)
            else "adapters off: no copy"
            if cfg.lora.enabled
            else "reference cache on disk: no model"
        )
    )
    return Part("reference", ref_bytes, ref_note)


def _weights_part(cfg: Config, shape: ModelShape, trainable: int, shard: int) -> Part:
    """The model's weights: model.dtype, the decoder's linears in NF4 under QLoRA, + the LoRA adapters in float32."""
    wbytes = DTYPE_BYTES[cfg.model.dtype]
    if cfg.model.quantization == "nf4":
        weights = shape.linear_params * NF4_BYTES + (shape.params - shape.linear_params) * wbytes
    else:
        weights = shape.params * wbytes
    note = _weights_note(cfg, shape)
    if cfg.lora.enabled:
        weights += trainable * 4
        note += f" + {trainable / 1e6:.1f}M LoRA"
    return Part("weights", weights / shard, note)


def _logits_part(cfg: Config, shape: ModelShape, tokens: int) -> Part:
    """The LM head's float32 logits, their log-softmax and its gradient, for as many tokens as the head sees at once."""
    fast = cfg.speed.packing or cfg.speed.prefix_sharing or cfg.speed.chunked_logps or cfg.speed.ref_cache
    completion = tokens  # worst case again: (almost) every token is a completion token
    if fast and cfg.speed.chunked_logps:
        chunk = min(auto_chunk_size(shape.vocab, cfg.speed.logps_chunk_size), completion)
        logits, head = 3 * chunk * shape.vocab * 4, f"chunked head: {chunk} tokens x {shape.vocab}"
    elif fast:
        logits, head = 3 * completion * shape.vocab * 4, f"{completion} completion tokens x {shape.vocab}"
    else:
        logits, head = 3 * tokens * shape.vocab * 4, f"every position: {tokens} x {shape.vocab}"
    return Part("logits", logits, head + " (float32 logits, log-softmax, gradient)")


def _step_part(
    cfg: Config, shape: ModelShape, trainable: int, grad_bytes: int, shard: int, device: str
) -> Optional[Part]:
    """The optimizer step's temporaries; None for the fused AdamW and adamw_8bit, which update in place."""
    fused = cfg.optim.fused and shard == 1  # optimizers.build_optimizer: for-each under FSDP / ZeRO-3
    if cfg.optim.name != "adamw" or fused:
        return None  # the fused kernel (and AdamW8bit) update in place: no temporaries
    if device == "cpu":
        largest = (
            shape.vocab * shape.hidden
            if not cfg.lora.enabled
            else max(cfg.lora.r * (a + b) for _, a, b, _, _ in _lora_matrices(cfg, shape))
        )
        return Part("step", 2 * largest * 4, "optimizer temporaries of the largest tensor (per-tensor AdamW on CPU)")
    return Part("step", trainable * grad_bytes / shard, "foreach AdamW: a temporary of every trainable parameter")


def plan_memory(
    cfg: Config,
    shape: ModelShape,
    gpus: int = 1,
    gpu_memory: Optional[float] = None,
    runtime: float = RUNTIME_BYTES,
    device: str = "cuda",
) -> Plan:
    """Peak bytes per GPU, part by part (see the module docstring for what each part counts).

    device="cpu" predicts a CPU run's growth of resident memory (tests check it against measured peak RSS):
    no runtime allowance is implied by it, and the optimizer step works tensor by tensor.
    """
    trainable = _lora_params(cfg, shape) if cfg.lora.enabled else shape.params
    grad_bytes = (
        4 if cfg.lora.enabled else DTYPE_BYTES[cfg.model.dtype]
    )  # peft keeps adapters in float32 under a half-precision base
    moving = _moving_reference(cfg)
    shard = (
        gpus if gpus > 1 and not moving else 1
    )  # FSDP full shard / ZeRO-3; a moving reference: DDP, every GPU holds all
    parts = [
        _weights_part(cfg, shape, trainable, shard),
        Part("gradients", trainable * grad_bytes / shard, f"{trainable / 1e6:.1f}M trainable"),
        Part(
            "optimizer", trainable * optimizer_state_bytes_per_param(cfg.optim.name, grad_bytes) / shard, cfg.optim.name
        ),
        _reference_part(cfg, shape, shard, moving),
    ]
    tokens = cfg.train.batch_size * 2 * cfg.data.max_length  # (2B, T) worst case: both rows fill max_length
    kept, recompute = _activation_bytes_per_token(cfg, shape)
    ckpt = "on" if cfg.train.gradient_checkpointing else "off"
    parts.append(Part("activations", tokens * (kept + recompute), f"{tokens} tokens, gradient checkpointing {ckpt}"))
    parts.append(_logits_part(cfg, shape, tokens))
    if not cfg.lora.enabled:
        parts.append(
            Part(
                "backward",
                2 * shape.vocab * shape.hidden * grad_bytes / shard,
                "embedding and LM-head gradients before accumulation",
            )
        )
    step = _step_part(cfg, shape, trainable, grad_bytes, shard, device)
    if step is not None:
        parts.append(step)
    if runtime:
        parts.append(Part("runtime", runtime, "CUDA context, workspaces, allocator slack"))
    return Plan(parts, gpus, gpu_memory, device)


def suggestions(cfg: Config, shape: ModelShape, plan: Plan) -> list[tuple[str, float, bool]]:
    """(change, bytes saved per GPU, fits after it) for every single change that lowers the peak, biggest saving first."""
    changes: dict[str, Config] = {}

    def change(text: str, **sections):
        changes[text] = dataclasses.replace(
            cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()}
        )

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
        change(
            "lora.enabled=true model.quantization=nf4 (QLoRA)", lora={"enabled": True}, model={"quantization": "nf4"}
        )
    if cfg.train.batch_size > 1:
        half = cfg.train.batch_size // 2
        change(
            f"train.batch_size={half} train.grad_accum={cfg.train.grad_accum * cfg.train.batch_size // half}",
            train={"batch_size": half, "grad_accum": cfg.train.grad_accum * cfg.train.batch_size // half},
        )
    runtime = plan.part("runtime")
    out = []
    for text, changed in changes.items():
        after = plan_memory(changed, shape, plan.gpus, plan.gpu_memory, runtime, plan.device)
        if after.total < plan.total:
            out.append((text, plan.total - after.total, bool(after.fits)))
    for gpus in (2, 4, 8) if not moving else ():  # a moving reference refuses FSDP/DeepSpeed (training.ref_sync)
        if gpus > plan.gpus:
            after = plan_memory(cfg, shape, gpus, plan.gpu_memory, runtime, plan.device)
            out.append(
                (
                    f"--gpus {gpus} with FSDP/ZeRO-3 (shards weights, gradients, optimizer)",
                    plan.total - after.total,
                    bool(after.fits),
                )
            )
            break
    return sorted(out, key=lambda s: -s[1])


def parse_size(text: str) -> float:
    """'80GB', '80GiB', '24G', '512MB' -> bytes (GB and G are taken as GiB, as GPU makers' 80 GB means)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"--gpu-memory {text!r}: expected a size like 80GB or 24GiB")
    return float(m.group(1)) * 1024 ** "BKMGT".index((m.group(2) or "B").upper())


def format_plan(cfg: Config, plan: Plan, tips: list[tuple[str, float, bool]]) -> str:
    how = (
        "DDP: a moving reference (loss.ref_sync_steps) is not sharded"
        if _moving_reference(cfg)
        else "FSDP/ZeRO-3 sharding"
    )
    per = "per GPU" + (f" ({plan.gpus} GPUs, {how})" if plan.gpus > 1 else "")
    lines = [
        f"dpokit plan: {cfg.model.name_or_path}, batch {cfg.train.batch_size} x {cfg.data.max_length} tokens, {per}"
    ]
    for p in plan.parts:
        lines.append(f"  {p.name:<12} {p.bytes / GIB:8.2f} GiB  {p.note}")
    lines.append(f"  {'peak':<12} {plan.total / GIB:8.2f} GiB")
    if plan.fits is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"{verdict} in {plan.gpu_memory / GIB:.0f} GiB per GPU")
    if tips and plan.fits is not True:
        lines.append("to lower the peak (one change each, biggest saving first):")
        for text, saved, fits in tips:
            lines.append(
                f"  {text:<60} -{saved / GIB:.2f} GiB" + ("  (then fits)" if fits and plan.fits is False else "")
            )
    return "\n".join(lines)
