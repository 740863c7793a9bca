"""The one place a model or tokenizer is loaded, with the safety checks; LoRA; dropout off.

Every verb loads through here: the policy for training (`load_policy`), a model for sampling,
scoring or evaluation (`load_model`), a reward model, the tokenizer. Where the reference comes
from is reference.py.

Safe loading (the checks are model_source.py's): a model folder that ships its own Python code
(an `auto_map` in config.json or tokenizer_config.json) is refused before transformers sees it
unless `model.trust_remote_code: true`, and pickle-based weights
(`pytorch_model.bin`, whose loading can execute code) are refused unless
`model.allow_pickle: true`; safetensors are required otherwise.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314): `model.quantization: nf4` loads the base in
4-bit NormalFloat through bitsandbytes (double quantisation, compute in model.dtype), freezes
it, and trains LoRA adapters on top; the reference is that same quantized base with the
adapters off, so it costs no memory.
"""

from __future__ import annotations

import warnings

import torch

from dpokit.config import Config, ConfigError, ModelConfig
from dpokit.cpu_threads import set_cpu_threads
from dpokit.model_source import TRAIN_OPT_IN, ModelLoadError, OptIn, check_model_source, model_settings
from dpokit.tiled_mlp import tile_mlps

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def _load_error(what: str, cfg: Config | ModelConfig, error: Exception, opt_in: OptIn = TRAIN_OPT_IN) -> ModelLoadError:
    model = model_settings(cfg)
    text = str(error)
    if "trust_remote_code" in text or "custom code" in text:
        return ModelLoadError(
            f"{what} at model.name_or_path={model.name_or_path!r} needs its own Python code to load; dpokit does not "
            f"run it unless {opt_in.trust_remote_code} (only if you trust its author)"
        )
    if not model.allow_pickle and ("safetensors" in text or "use_safetensors" in text):
        return ModelLoadError(
            f"could not load {what} at model.name_or_path={model.name_or_path!r} from safetensors weights "
            f"({type(error).__name__}: {text}); if it only has pickle-based weights (pytorch_model.bin) and you trust "
            f"them, set {opt_in.allow_pickle}"
        )
    return ModelLoadError(
        f"could not load {what} at model.name_or_path={model.name_or_path!r}: {type(error).__name__}: {text}"
    )


def load_tokenizer(cfg: Config | ModelConfig, opt_in: OptIn = TRAIN_OPT_IN):
    from transformers import AutoTokenizer

    model = model_settings(cfg)
    check_model_source(model, needs=("tokenizer",), opt_in=opt_in)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model.name_or_path, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except Exception as e:  # any failure to read a user's model folder is a user-facing error, not a traceback
        raise _load_error("the tokenizer", model, e, opt_in) from None
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and labels, so any id works; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token is None:
        raise ModelLoadError(f"the tokenizer of {model.name_or_path!r} has no EOS token; completions could not end")
    return tokenizer


def load_processor(cfg: Config | ModelConfig, opt_in: OptIn = TRAIN_OPT_IN):
    """The model's processor (AutoProcessor: image processor + tokenizer + chat template) for data.vision rows."""
    from transformers import AutoProcessor

    model = model_settings(cfg)
    check_model_source(model, needs=("tokenizer",), opt_in=opt_in)
    try:
        processor = AutoProcessor.from_pretrained(
            model.name_or_path, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except Exception as e:  # a user-facing error, not a traceback
        raise _load_error("the processor", model, e, opt_in) from None
    if getattr(processor, "image_token", None) is None or not hasattr(processor, "image_processor"):
        raise ModelLoadError(
            f"data.vision=true needs a vision-language processor (an image processor and an image token); "
            f"model.name_or_path={model.name_or_path!r} loads a {type(processor).__name__}"
        )
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor


def load_model_config(cfg: Config | ModelConfig):
    """The model's config.json (a transformers PretrainedConfig): no weights, never remote code."""
    from transformers import AutoConfig

    model = model_settings(cfg)
    check_model_source(model)
    try:
        return AutoConfig.from_pretrained(model.name_or_path, revision=model.revision, trust_remote_code=False)
    except Exception as e:  # a hub id offline, a folder without config.json: a user-facing error
        raise _load_error("the model's config", model, e) from None


def load_weights(cfg: Config | ModelConfig, auto_class=None, opt_in: OptIn = TRAIN_OPT_IN):
    """`from_pretrained` after the safety checks: every model dpokit loads comes through here.

    auto_class: a transformers Auto class (default AutoModelForCausalLM; a reward model passes
    AutoModelForSequenceClassification).
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if auto_class is None and isinstance(cfg, Config) and cfg.data.vision:
        auto_class = AutoModelForImageTextToText  # vision-language models are not causal-LM classes in transformers 5
    model = model_settings(cfg)
    check_model_source(model, needs=("model",), opt_in=opt_in)
    kwargs = {"dtype": DTYPES[model.dtype], "revision": model.revision, "trust_remote_code": model.trust_remote_code}
    if not model.allow_pickle:
        kwargs["use_safetensors"] = True  # transformers then never falls back to pytorch_model.bin
    if model.attn_implementation:
        kwargs["attn_implementation"] = model.attn_implementation
    quantization = quantization_config(model)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": 0} if torch.cuda.is_available() else "cpu"  # bitsandbytes quantizes as it places
    try:
        loaded = (auto_class or AutoModelForCausalLM).from_pretrained(model.name_or_path, **kwargs)
    except Exception as e:  # any failure to read a user's model folder is a user-facing error, not a traceback
        raise _load_error("the model", model, e, opt_in) from None
    if quantization is not None and not torch.cuda.is_available():
        check_cpu_4bit_widths(loaded)
    return loaded


def check_cpu_4bit_widths(model) -> None:
    """ModelLoadError for a 4-bit layer that bitsandbytes' AVX-512 bf16 CPU kernel cannot hold.

    On such a CPU (Intel Xeon with avx512_bf16) bitsandbytes repacks each 4-bit weight at the first no-grad
    forward (the reference), reshaping its scales to (out, in // blocksize) and tiling outputs by 32: a layer
    narrower than the 64-value block crashed there with "shape '[32, 0]' is invalid". Other CPUs take a
    path without this limit, so only those that repack are refused. Real models are far wider.
    """
    import bitsandbytes

    if not bitsandbytes.functional.has_avx512bf16():
        return
    for name, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None or not hasattr(module, "in_features"):
            continue
        if module.in_features % state.blocksize or module.out_features % 32:
            raise ModelLoadError(
                f"model.quantization=nf4 on this CPU (AVX-512 bf16): bitsandbytes' kernel needs 4-bit layer "
                f"widths in multiples of {state.blocksize} (inputs) and 32 (outputs), and {name} has "
                f"in_features={module.in_features}, out_features={module.out_features}; "
                "use model.quantization=none, or a GPU"
            )


def quantization_config(cfg: Config | ModelConfig):
    """transformers' BitsAndBytesConfig for model.quantization (None for "none"); one clear error without bitsandbytes.

    nf4 as in the QLoRA paper: 4-bit NormalFloat weights, double quantisation of their scales,
    matmuls in model.dtype (bfloat16 on GPU is the usual choice; "auto"/float32 compute in float32).
    """
    model = model_settings(cfg)
    if model.quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401 - only to know it is there
    except ImportError:
        raise ModelLoadError(
            "model.quantization=nf4 needs bitsandbytes: pip install 'dpokit[quantization]' "
            "(or set model.quantization=none)"
        ) from None
    from transformers import BitsAndBytesConfig

    compute = DTYPES[model.dtype] if model.dtype != "auto" else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )


def load_policy(cfg: Config):
    """The trainable policy: weights, dropout off (as TRL), gradient checkpointing, LoRA adapters."""
    model = load_weights(cfg)
    set_cpu_threads(model, cfg.train.num_threads)
    disable_dropout(model)
    if cfg.model.quantization != "none":
        prepare_quantized(model)
    if cfg.train.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name (the old one warns)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    tile_mlps(model, cfg.speed.tiled_mlp)  # speed.tiled_mlp: MLPs over sequence chunks (0: off)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg)
    return model


def load_model(cfg: Config | ModelConfig, auto_class=None, device: str | None = None, opt_in: OptIn = TRAIN_OPT_IN):
    """(model in eval mode on `device`, tokenizer) for sampling, scoring and evaluation; on the GPU when there is one."""
    tokenizer = load_tokenizer(cfg, opt_in)
    model = load_weights(cfg, auto_class, opt_in)
    set_cpu_threads(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


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


def prepare_quantized(model) -> None:
    """A 4-bit base made ready for adapters: every base weight frozen, norms and the rest kept in float32.

    What peft's `prepare_model_for_kbit_training` does, minus its gradient-checkpointing switch
    (load_policy turns checkpointing on itself, non-reentrant, with `enable_input_require_grads`).
    """
    for param in model.parameters():
        param.requires_grad_(False)
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()  # layer norms and embeddings: small, and unstable in half precision


def apply_lora(model, cfg: Config):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = cfg.lora.target_modules
    if cfg.data.vision and targets == "all-linear":
        targets = language_model_linears(model)
    targets, parameters = expert_parameter_targets(model, targets)
    if parameters and cfg.lora.dropout:
        raise ConfigError(
            f"lora.target_modules names the experts' weights ({', '.join(parameters)}), which peft adapts only "
            f"without dropout: set lora.dropout=0 (got {cfg.lora.dropout})"
        )
    peft_config = PeftLoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets,
        target_parameters=parameters,
        task_type="CAUSAL_LM",
    )
    if cfg.train.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings would otherwise cut the checkpointed graph
    with warnings.catch_warnings():
        # peft asks transformers 5 for `is_gradient_checkpointing`, which warns that the name is deprecated: a
        # message about peft's code that the user can do nothing about, printed at every LoRA run.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, peft_config)


def expert_parameter_targets(model, targets):
    """(target_modules, target_parameters) for peft: names in lora.target_modules that are a mixture-of-experts layer's
    3D expert weights (transformers 5 keeps the experts of Mixtral, Qwen-MoE, ... as `experts.gate_up_proj` and
    `experts.down_proj` parameters, not as linear modules) go to peft's target_parameters; a name that is also a
    linear module (Qwen2-MoE's shared expert's down_proj) stays a module target too. None: no expert weight named.
    A string (all-linear, a regex) is peft's: linear modules only, the experts' 3D weights untouched."""
    if isinstance(targets, str):
        return targets, None
    experts = {name for name, param in model.named_parameters() if param.dim() == 3}
    parameters = [t for t in targets if any(name == t or name.endswith(f".{t}") for name in experts)]
    if not parameters:
        return targets, None
    modules = {name for name, _ in model.named_modules()}
    kept = [t for t in targets if t not in parameters or any(name == t or name.endswith(f".{t}") for name in modules)]
    return kept, parameters


def language_model_linears(model) -> list[str]:
    """The language model's linear layers of a vision-language model (lora.target_modules=all-linear with data.vision):
    the vision tower, the projector and the LM head keep their weights."""
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".language_model." in f".{name}."
    ]
    if not names:
        raise ModelLoadError(
            "lora.target_modules=all-linear with data.vision=true adapts the language model's linear layers, "
            f"and {type(model).__name__} has no `language_model` module; name lora.target_modules explicitly"
        )
    return names
