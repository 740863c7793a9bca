"""TR-DPO's moving reference (Gorbatovski et al. 2024, arXiv 2404.09656): soft updates of the reference towards the policy.

    every loss.ref_sync_steps optimizer steps, after the update (TRL's SyncRefModelCallback: on_step_end
    when global_step % ref_model_sync_steps == 0):
        ref <- alpha * policy + (1 - alpha) * ref        parameter by parameter (buffers stay), alpha = loss.ref_sync_alpha

The reference is always a separate frozen model here (reference.make_reference): full fine-tuning
copies the policy; under LoRA it is a copy of the merged model (base + adapters, which are zero at
the start, so it starts equal to the adapters-off reference), and the policy's side of the formula
is its merged weights W + delta(B, A), computed without touching the policy. Under DDP every
process holds the same replica of the reference and syncs it from its (identical) unwrapped
policy, so the replicas stay identical without communication. FSDP/DeepSpeed shard both models:
refused (`check_sync`).

Once the reference has moved, every checkpoint carries it (reference.safetensors) and a resume
reads it back (checkpoint.py), so a resumed run continues with the same reference bit for bit.
"""

from __future__ import annotations

import torch

from dpokit.config import Config, ConfigError


def policy_weights(policy) -> dict[str, torch.Tensor]:
    """The policy's weights under the names of a plain (merged) model: name -> tensor.

    A PeftModel's LoRA layers give W + delta, delta = peft's own `get_delta_weight` (B @ A * scaling,
    transposed for fan_in_fan_out layers), exactly what merge_and_unload would write into W.
    """
    if not hasattr(policy, "peft_config"):
        return dict(policy.named_parameters())
    from peft.tuners.tuners_utils import BaseTunerLayer  # lazy: slow to import, and only LoRA needs it

    base = policy.get_base_model()
    weights = {name.replace(".base_layer", ""): p for name, p in base.named_parameters() if ".lora_" not in name}
    for name, module in base.named_modules():
        if isinstance(module, BaseTunerLayer) and not module.merged:
            for adapter in module.active_adapters:
                if adapter in getattr(module, "lora_A", {}) or adapter in getattr(module, "lora_embedding_A", {}):
                    weights[f"{name}.weight"] = weights[f"{name}.weight"] + module.get_delta_weight(adapter)
    return weights


def check_sync(cfg: Config, reference, policy, sharded: bool) -> None:
    """Refuse a setup the sync cannot serve, naming the keys: sharded models, or a reference whose weights do not match the policy's."""
    if sharded:
        raise ConfigError(
            "loss.ref_sync_steps works with one process or DDP; under FSDP/DeepSpeed the policy and the reference "
            "are sharded and cannot be mixed weight by weight: set loss.ref_sync_steps=0 or use DDP"
        )
    ours, theirs = dict(reference.named_parameters()), policy_weights(policy)
    bad = [n for n in ours if n not in theirs or theirs[n].shape != ours[n].shape] + [
        n for n in theirs if n not in ours
    ]
    if bad:
        source = (
            f"model.ref_name_or_path={cfg.model.ref_name_or_path!r}" if cfg.model.ref_name_or_path else "the reference"
        )
        raise ConfigError(
            f"loss.ref_sync_steps={cfg.loss.ref_sync_steps}: {source} does not have the policy's weights "
            f"(first differing: {bad[:3]}); TR-DPO mixes them weight by weight, so it needs the same architecture"
        )


@torch.no_grad()
def sync_reference(reference, policy, alpha: float) -> None:
    """ref <- alpha * policy + (1 - alpha) * ref, in place, for every parameter of the (unwrapped) reference."""
    sources = policy_weights(policy)
    for name, param in reference.named_parameters():
        source = sources[name].detach()
        if source.dtype == param.dtype and source.device == param.device:
            param.mul_(1.0 - alpha).add_(source, alpha=alpha)  # TRL's SyncRefModelCallback._sync_target_model
        else:  # model.ref_dtype: mix in float32, then round once into the reference's dtype
            param.copy_(param.float().mul_(1.0 - alpha).add_(source.to(param.device, torch.float32), alpha=alpha))


def is_sync_step(cfg: Config, step: int) -> bool:
    return cfg.loss.ref_sync_steps > 0 and step % cfg.loss.ref_sync_steps == 0
