"""train.fsdp=true: FSDP2 full sharding of the policy (and of a live reference) with torch's own engine.

    (sharding itself, dpokit/sharding.py: every decoder layer is its own unit, then the root; parameters become
    DTensor shards over all processes, gloo on CPU and NCCL on GPU, in the launcher's process group)
    fsdp_problem         the one-line refusal of a setting FSDP2 cannot serve here
    clip_gradients       the global gradient norm over the shards, then clipping (torch's DTensor-aware utilities)
    save_sharded, load_sharded  model and optimizer shards through torch.distributed.checkpoint (DCP): every
                         process writes its own shard; the manifest names each shard's owner, so a checkpoint
                         written by N processes loads on M (resharding is DCP's)
    full_state_dict      the whole model gathered to the main process's CPU memory, for final/

Accelerate refuses its FSDP plugin without an accelerator, so dpokit calls `fully_shard` itself:
one code path, exercised on CPU in the tests and unchanged on GPUs. The policy is not passed to
`accelerator.prepare` (that would wrap it in DDP); the optimizer and schedule still are.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dpokit.config import Config
from dpokit.sharding import is_fsdp, resharded

DCP_FOLDER = "dcp"  # checkpoint-<step>/dcp/: .metadata and one __<rank>_0.distcp per process


def fsdp_problem(cfg: Config, distributed_type: str) -> str | None:
    """Why train.fsdp cannot run with these settings, or Accelerate's FSDP plugin asks for sharding (None: it can run)."""
    if distributed_type == "FSDP":
        return (
            "Accelerate's FSDP plugin is not how dpokit shards: launch with a plain multi-process config (torchrun, or "
            "accelerate launch --multi_gpu) and set train.fsdp=true, which shards with torch's FSDP2 (docs/distributed.md)"
        )
    if distributed_type == "DEEPSPEED" and cfg.speed.tiled_mlp > 0:  # ZeRO-3 gathers per submodule call: per tile
        return (
            "speed.tiled_mlp under DeepSpeed ZeRO-3: the number of tiles differs between processes, and so would the "
            "number of parameter gathers (a collective); set speed.tiled_mlp=0, or shard with train.fsdp=true"
        )
    if not cfg.train.fsdp:
        return None
    if distributed_type == "DEEPSPEED":
        return (
            "train.fsdp=true shards with torch's FSDP2 itself; launch with a plain multi-process config (torchrun, or "
            "accelerate launch without an FSDP/DeepSpeed config)"
        )
    if cfg.train.mixed_precision == "fp16":
        return "train.fsdp=true with train.mixed_precision=fp16: the fp16 loss scaler does not handle sharded gradients; use bf16"
    if cfg.train.eval_generate > 0:
        return (
            "train.fsdp=true with train.eval_generate: sampling from a sharded model needs every process in every decoding "
            "step; set train.eval_generate=0 and sample the final model with `dpokit sample`"
        )
    if cfg.data.retention_path:
        return "train.fsdp=true with data.retention_path is not supported yet: drop data.retention_path or use DDP"
    if cfg.loss.ref_sync_steps > 0:  # before anything loads (ref_sync.check_sync would say it after sharding)
        return (
            "train.fsdp=true with loss.ref_sync_steps (TR-DPO): the policy and the reference are sharded and cannot be "
            "mixed weight by weight; set loss.ref_sync_steps=0 or use DDP"
        )
    if cfg.model.quantization != "none":
        return f"train.fsdp=true with model.quantization={cfg.model.quantization}: FSDP2 does not shard bitsandbytes' 4-bit weights"
    if cfg.optim.name != "adamw":
        return f"train.fsdp=true with optim.name={cfg.optim.name}: bitsandbytes' 8-bit AdamW does not take DTensor shards; use adamw"
    return None


def clip_grad_norm(accelerator, policy, params: list[torch.Tensor], max_norm: float):
    """The step's gradient clipping: over FSDP2 shards here, else Accelerate's (DDP, DeepSpeed, one process)."""
    return clip_gradients(params, max_norm) if is_fsdp(policy) else accelerator.clip_grad_norm_(params, max_norm)


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip sharded gradients to the global norm max_norm (inf: only measure); returns that norm (a plain tensor)."""
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    grads = [p.grad for p in params if p.grad is not None]
    total = get_total_norm(grads)
    total = total.full_tensor() if hasattr(total, "full_tensor") else total
    if max_norm != float("inf"):
        clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, total)
    return total


def _trainable_names(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def save_sharded(folder: Path, model, optimizer) -> None:
    """Every process writes its shard of the trainable weights and their AdamW state into folder/dcp (a collective).

    Under LoRA only the adapters are saved (the frozen base is re-read from model.name_or_path), as
    in the one-process format."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(resharded(model), _inner(optimizer))
    keep = _trainable_names(model)
    try:
        dcp.save(
            {"model": {k: v for k, v in model_state.items() if k in keep}, "optim": optim_state},
            checkpoint_id=str(Path(folder) / DCP_FOLDER),
        )
    except dcp.api.CheckpointException as e:  # a process's write failed: its OSError (a full disk) is the checkpoint's
        cause = next((f[0] for f in e._failures.values() if isinstance(f[0], OSError)), None)
        if cause is None:
            raise
        raise cause from None


def load_sharded(folder: Path, model, optimizer) -> None:
    """The shards of folder/dcp into this process's model and optimizer, whatever the number of processes that wrote them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(resharded(model), _inner(optimizer))
    keep = _trainable_names(model)
    state = {"model": {k: v for k, v in model_state.items() if k in keep}, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(Path(folder) / DCP_FOLDER))
    set_state_dict(
        model,
        _inner(optimizer),
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=StateDictOptions(strict=False),
    )


def full_state_dict(model) -> dict:
    """The whole model's weights on the main process's CPU (other processes get {}); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(resharded(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _inner(optimizer):
    """The torch optimizer inside Accelerate's AcceleratedOptimizer."""
    return getattr(optimizer, "optimizer", optimizer)
