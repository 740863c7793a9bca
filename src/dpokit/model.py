"""Policy, reference and tokenizer.

- Full fine-tuning: the reference is a frozen deep copy of the policy made in
  memory right after loading (not re-read from disk), so both start identical
  even when the checkpoint was modified on load.
- LoRA (peft): the reference is the same model with its adapters disabled; no
  second copy of the weights exists.
- Reference-free losses: no reference at all.

Safe loading: a model folder that ships its own Python code (an `auto_map` in
config.json or tokenizer_config.json) is refused before transformers sees it
unless `model.trust_remote_code: true`, and pickle-based weights
(`pytorch_model.bin`, whose loading can execute code) are refused unless
`model.allow_pickle: true`; safetensors are required otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os

import torch

from dpokit.config import Config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


class ModelLoadError(RuntimeError):
    """The model or tokenizer could not be loaded; the message says which and why."""


PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.ckpt", "tf_model.h5", "flax_model.msgpack")
CODE_FILES = ("config.json", "tokenizer_config.json")


def check_model_source(cfg: Config) -> None:
    """Refuse, before any loading, a local model folder with custom code or only pickle weights (unless allowed)."""
    path = os.path.expanduser(cfg.model.name_or_path)
    if not path:
        raise ModelLoadError("model.name_or_path is not set: give a local HF model folder or a hub id")
    if not os.path.isdir(path):
        return  # a hub id: transformers itself refuses remote code, and use_safetensors refuses pickle
    if not cfg.model.trust_remote_code:
        for name in CODE_FILES:
            auto_map = _read_json(os.path.join(path, name)).get("auto_map")
            if auto_map:
                targets = ", ".join(sorted({str(v) for v in _flatten(auto_map)}))
                raise ModelLoadError(
                    f"model.name_or_path={cfg.model.name_or_path!r} ships its own Python code ({name} has an auto_map: "
                    f"{targets}); dpokit does not run code that comes with a model unless you set "
                    "model.trust_remote_code=true (only do so if you have read that code and trust its author)"
                )
    files = set(os.listdir(path))
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    pickled = sorted(f for f in files if f in PICKLE_WEIGHTS or (f.startswith("pytorch_model-") and f.endswith(".bin")))
    if pickled and not has_safetensors and not cfg.model.allow_pickle:
        raise ModelLoadError(
            f"model.name_or_path={cfg.model.name_or_path!r} has only pickle-based weights ({', '.join(pickled)}); "
            "loading a pickle can run arbitrary code. Convert them to safetensors, or set model.allow_pickle=true "
            "if you trust where the file comes from"
        )


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise ModelLoadError(f"{path}: not a readable JSON file: {type(e).__name__}: {e}") from None
    return value if isinstance(value, dict) else {}


def _flatten(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _flatten(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _flatten(v)
    elif value is not None:
        yield value


def _load_error(what: str, cfg: Config, error: Exception) -> ModelLoadError:
    text = str(error)
    if "trust_remote_code" in text or "custom code" in text:
        return ModelLoadError(
            f"{what} at model.name_or_path={cfg.model.name_or_path!r} needs its own Python code to load; dpokit does not "
            "run it unless model.trust_remote_code=true (only if you trust its author)"
        )
    if not cfg.model.allow_pickle and ("safetensors" in text or "use_safetensors" in text):
        return ModelLoadError(
            f"could not load {what} at model.name_or_path={cfg.model.name_or_path!r} from safetensors weights "
            f"({type(error).__name__}: {text}); if it only has pickle-based weights (pytorch_model.bin) and you trust "
            "them, set model.allow_pickle=true"
        )
    return ModelLoadError(f"could not load {what} at model.name_or_path={cfg.model.name_or_path!r}: {type(error).__name__}: {text}")


def load_tokenizer(cfg: Config):
    from transformers import AutoTokenizer

    check_model_source(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            cfg.model.name_or_path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except Exception as e:  # any failure to read a user's model folder is a user-facing error, not a traceback
        raise _load_error("the tokenizer", cfg, e) from None
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and labels, so any id works; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token is None:
        raise ModelLoadError(f"the tokenizer of {cfg.model.name_or_path!r} has no EOS token; completions could not end")
    return tokenizer


def load_policy(cfg: Config):
    from transformers import AutoModelForCausalLM

    check_model_source(cfg)
    kwargs = {"dtype": DTYPES[cfg.model.dtype], "revision": cfg.model.revision, "trust_remote_code": cfg.model.trust_remote_code}
    if not cfg.model.allow_pickle:
        kwargs["use_safetensors"] = True  # transformers then never falls back to pytorch_model.bin
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, **kwargs)
    except Exception as e:  # any failure to read a user's model folder is a user-facing error, not a traceback
        raise _load_error("the model", cfg, e) from None
    disable_dropout(model)
    if cfg.train.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name (the old one warns)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
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
    """A frozen copy for full fine-tuning; None when LoRA (adapters off) or no reference is needed.

    With model.ref_name_or_path the reference is that model instead, loaded with the policy's
    settings (e.g. the SFT model while the policy starts from an earlier DPO round's weights).
    """
    if not needs_reference:
        return None
    if cfg.model.ref_name_or_path:
        ref_model = dataclasses.replace(cfg.model, name_or_path=cfg.model.ref_name_or_path)
        ref_cfg = dataclasses.replace(cfg, model=ref_model, lora=dataclasses.replace(cfg.lora, enabled=False),
                                      train=dataclasses.replace(cfg.train, gradient_checkpointing=False))
        try:
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
    if cfg.lora.enabled:
        return None
    reference = copy.deepcopy(policy)
    reference.eval()
    reference.requires_grad_(False)
    return reference


def prepare_reference(reference, accelerator):
    """Place the frozen reference for the distributed setup; None stays None.

    - one process / DDP: a plain replica on each device (no gradients, so no DDP wrapper);
    - FSDP: wrapped in FSDP with the policy's plugin (full shard), so each GPU holds only its
      shard of the reference too (`prepare_model` without `evaluation_mode`, which would replicate it);
    - DeepSpeed: its own inference engine with the same ZeRO stage (ZeRO-3 shards it), as TRL does;
      lower stages keep a replica.
    """
    if reference is None:
        return None
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        reference = accelerator.prepare_model(reference)
    elif accelerator.distributed_type == DistributedType.DEEPSPEED:
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
        zero.update(reduce_bucket_size=hidden * hidden, stage3_param_persistence_threshold=10 * hidden, stage3_prefetch_bucket_size=int(0.9 * hidden * hidden))
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
