"""Policy, reference and tokenizer.

- Full fine-tuning: the reference is a frozen deep copy of the policy made in
  memory right after loading (not re-read from disk), so both start identical
  even when the checkpoint was modified on load.
- LoRA (peft): the reference is the same model with its adapters disabled; no
  second copy of the weights exists.
- Reference-free losses: no reference at all.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from dpokit.config import Config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


class ModelLoadError(RuntimeError):
    """The model or tokenizer could not be loaded; the message says which and why."""


def load_tokenizer(cfg: Config):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            cfg.model.name_or_path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the tokenizer of model.name_or_path={cfg.model.name_or_path!r}: {e}") from None
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and labels, so any id works; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token is None:
        raise ModelLoadError(f"the tokenizer of {cfg.model.name_or_path!r} has no EOS token; completions could not end")
    return tokenizer


def load_policy(cfg: Config):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": DTYPES[cfg.model.dtype], "revision": cfg.model.revision, "trust_remote_code": cfg.model.trust_remote_code}
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load model.name_or_path={cfg.model.name_or_path!r}: {e}") from None
    disable_dropout(model)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora.enabled:
        model = apply_lora(model, cfg)
    return model


def disable_dropout(model) -> None:
    """Dropout off in the policy (before LoRA, so lora.dropout still applies), as TRL does.

    The reference runs in eval mode; a policy with dropout would start from noisy,
    non-zero implicit rewards and a loss that is not log 2.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # Llama-style functional dropout
            module.attention_dropout = 0.0


def apply_lora(model, cfg: Config):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    if cfg.train.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings would otherwise cut the checkpointed graph
    return get_peft_model(model, peft_config)


def make_reference(policy, cfg: Config, needs_reference: bool):
    """A frozen copy for full fine-tuning; None when LoRA (adapters off) or no reference is needed."""
    if not needs_reference or cfg.lora.enabled:
        return None
    reference = copy.deepcopy(policy)
    reference.eval()
    reference.requires_grad_(False)
    return reference


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
