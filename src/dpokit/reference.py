"""Where the frozen reference comes from, and how it runs.

- Full fine-tuning: a frozen deep copy of the policy made in memory right after loading (not
  re-read from disk), so both start identical even when the checkpoint was modified on load;
  with model.ref_dtype that copy is cast to it (e.g. a bfloat16 reference beside a float32 policy:
  half the reference's memory, log-probs of the rounded weights).
- model.ref_name_or_path: that model, loaded with the policy's settings through models.load_policy
  (whole under DeepSpeed ZeRO-3, as the policy: `loaded_whole`).
- LoRA (peft): the same model with its adapters disabled (`reference_mode`); no second copy. With a
  moving reference (loss.ref_sync_steps, TR-DPO) a frozen copy of the merged model instead (`_merged_copy`).
- Reference-free losses: no reference at all.
- Cached: no reference model in memory; its log-probs come from ref_cache/ (training/setup.py decides).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os

import torch

from dpokit.config import Config
from dpokit.model_source import ModelLoadError
from dpokit.models import DTYPES, load_policy


def make_reference(policy, cfg: Config, needs_reference: bool):
    """A frozen copy for full fine-tuning; None when LoRA (adapters off) or no reference is needed.

    With model.ref_name_or_path the reference is that model instead, loaded with the policy's
    settings (e.g. the SFT model while the policy starts from an earlier DPO round's weights).
    """
    if not needs_reference:
        return None
    if cfg.model.ref_name_or_path:
        ref_model = dataclasses.replace(
            cfg.model, name_or_path=cfg.model.ref_name_or_path, dtype=cfg.model.ref_dtype or cfg.model.dtype
        )
        ref_cfg = dataclasses.replace(
            cfg,
            model=ref_model,
            lora=dataclasses.replace(cfg.lora, enabled=False),
            train=dataclasses.replace(cfg.train, gradient_checkpointing=False),
        )
        try:
            with loaded_whole():
                reference = load_policy(ref_cfg)
        except ModelLoadError as e:
            raise ModelLoadError(f"the reference (model.ref_name_or_path): {e}") from None
        if reference.get_input_embeddings().weight.shape[0] != policy.get_input_embeddings().weight.shape[0]:
            raise ModelLoadError(
                f"model.ref_name_or_path={cfg.model.ref_name_or_path!r} has a vocabulary of "
                f"{reference.get_input_embeddings().weight.shape[0]} tokens and the policy "
                f"{policy.get_input_embeddings().weight.shape[0]}: the reference must use the policy's tokenizer"
            )
        reference.eval()
        reference.requires_grad_(False)
        return reference
    if cfg.lora.enabled and cfg.loss.ref_sync_steps > 0:
        return _merged_copy(policy)
    if cfg.lora.enabled:
        return None
    reference = copy.deepcopy(policy)
    if cfg.model.ref_dtype:
        reference.to(DTYPES[cfg.model.ref_dtype])
    reference.eval()
    reference.requires_grad_(False)
    return reference


@contextlib.contextmanager
def loaded_whole():
    """Models loaded inside come whole, also under DeepSpeed ZeRO-3 with zero3_init_flag false (the shipped config).

    Accelerate registers its ZeRO-3 config with transformers whatever zero3_init_flag says, so from_pretrained would
    partition the weights as it loads them (deepspeed.zero.Init): the reference's deep copy would hold empty tensors
    and a vocabulary check would read 0 rows. The registration is lifted for the load and restored after it
    (transformers reads it elsewhere, e.g. generate's synced_gpus). Outside DeepSpeed: nothing, and no import.
    """
    plugin = _deepspeed_plugin()
    if plugin is None or plugin.zero3_init_flag:
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def _deepspeed_plugin():
    """Accelerate's active DeepSpeed plugin, or None (no DeepSpeed launch, or no Accelerator made yet)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    from accelerate.state import AcceleratorState

    return AcceleratorState().deepspeed_plugin if AcceleratorState._shared_state else None


def _merged_copy(peft_policy):
    """LoRA with a moving reference (loss.ref_sync_steps): a frozen copy of the merged model, base + adapters.

    The adapters-off reference cannot move (it is the frozen base itself), and a low-rank adapter cannot hold
    the average of two models, so TR-DPO under LoRA costs one full copy of the model. At the start the
    adapters are zero (lora_B = 0), so the copy equals the adapters-off reference.
    """
    reference = copy.deepcopy(peft_policy).merge_and_unload()
    reference.eval()
    reference.requires_grad_(False)
    return reference


def prepare_reference(reference, accelerator):
    """Place the frozen reference for the distributed setup; None stays None.

    - one process / DDP: a plain replica on each device (no gradients, so no DDP wrapper);
    - train.fsdp: not here; training/setup.py shards it like the policy (training/fsdp.py);
    - DeepSpeed: its own inference engine with the same ZeRO stage (ZeRO-3 shards it), as TRL does;
      lower stages keep a replica.
    """
    if reference is None:
        return None
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        reference = _deepspeed_reference(reference, accelerator)
    else:
        reference = accelerator.prepare_model(reference, evaluation_mode=True)
    reference.eval()
    return reference


def _deepspeed_reference(reference, accelerator):
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    zero = config.setdefault("zero_optimization", {})
    hidden = getattr(reference.config, "hidden_size", None)
    if zero.get("stage") == 3 and hidden:
        zero.update(
            reduce_bucket_size=hidden * hidden,
            stage3_param_persistence_threshold=10 * hidden,
            stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
        )
    elif zero.get("stage") != 3:
        zero["stage"] = 0  # inference needs no optimizer-state partitioning
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    engine, *_ = deepspeed.initialize(model=reference, config=config)
    return engine


@contextlib.contextmanager
def reference_mode(policy, reference):
    """Yields the module that computes reference log-probs, with no gradients.

    With a separate reference this is that model; with LoRA it is the policy
    with its adapters disabled (peft's `disable_adapter`), in eval mode so
    dropout in the adapters or the base cannot perturb the reference.
    """
    with torch.no_grad():
        if reference is not None:
            yield reference
            return
        was_training = policy.training
        policy.eval()
        peft_model = getattr(policy, "module", policy)  # under DDP the PeftModel is wrapped
        try:
            with peft_model.disable_adapter():
                yield policy
        finally:
            policy.train(was_training)
