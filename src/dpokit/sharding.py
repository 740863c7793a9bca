"""FSDP2 full sharding (train.fsdp=true) of a loaded model, with torch's own `fully_shard`: below the training loop,
so that `dpokit precompute` shards the reference the same way (ref_cache/build.py). Checkpoints, clipping and
the refusals are training's (training/fsdp.py)."""

from __future__ import annotations

import torch

from dpokit.config import Config

_PARAM_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_OWN_GROUP: list[bool] = []  # set while a group of one that `shard` made exists (no launcher made one)


def release_process_group() -> None:
    """Destroy the group of one `shard` made for a lone process, at the end of its run: a notebook or a sweep that
    trains again in the same process starts clean (a launcher's group is the launcher's, left alone)."""
    import torch.distributed as dist

    if _OWN_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWN_GROUP.clear()


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one: modules of the model's `_no_split_modules` classes (a PEFT model's base too)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard(model, cfg: Config, device: torch.device, trainable: bool = True):
    """FSDP2 full sharding in place: each decoder layer, then the root; returns the model (now an FSDPModule).

    Mixed precision follows train.mixed_precision (parameters computed in bf16, gradients reduced in float32)
    through MixedPrecisionPolicy; otherwise the model's own dtype (model.dtype) is kept.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():  # one process that no launcher started: a group of one, in memory
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1
        )
        _OWN_GROUP.append(True)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    param_dtype = _PARAM_DTYPES.get(cfg.train.mixed_precision)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(
            f"train.fsdp=true: {type(model).__name__} names no decoder layer class (_no_split_modules) to shard by"
        )
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if not trainable:
        model.requires_grad_(False)
    return model


def resharded(model):
    """The model with every unit's parameters back to their shards: FSDP2 leaves the root's unsharded after a forward
    without backward (a reference-cache build, an evaluation), and the optimizer and torch.distributed.checkpoint
    know the sharded ones."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return model


def is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
