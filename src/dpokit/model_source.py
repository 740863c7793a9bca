"""What a model folder must be before dpokit loads it, and the error every failed load raises.

Safe loading: a model folder that ships its own Python code (an `auto_map` in
config.json or tokenizer_config.json) is refused before transformers sees it
unless `model.trust_remote_code: true`, and pickle-based weights
(`pytorch_model.bin`, whose loading can execute code) are refused unless
`model.allow_pickle: true`; safetensors are required otherwise. A missing or incomplete
local folder is refused with what it lacks. models.py runs these checks before every load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from dpokit.config import Config, ModelConfig
from dpokit.inputs import InputError, read_json


class ModelLoadError(RuntimeError):
    """The model or tokenizer could not be loaded; the message says which and why."""


PICKLE_WEIGHTS = (
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "model.ckpt",
    "tf_model.h5",
    "flax_model.msgpack",
)
CODE_FILES = ("config.json", "tokenizer_config.json")


def model_settings(cfg: Config | ModelConfig) -> ModelConfig:
    """The `model:` settings of a whole Config, or the ModelConfig itself (verbs that load one model by name)."""
    return cfg.model if isinstance(cfg, Config) else cfg


# What a Hugging Face model folder (save_pretrained) holds; a PEFT adapter folder has adapter_config.json instead.
MODEL_CONFIGS = ("config.json", "adapter_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def _looks_like_path(spec: str) -> bool:
    """A local path rather than a hub id ("org/name"): absolute, relative (./, ../, ~), or deeper than org/name."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or os.path.exists(spec)


def _missing_parts(path: str, needs: tuple[str, ...]) -> list[str]:
    files = set(os.listdir(path))
    missing = []
    if "model" in needs:
        if not files & set(MODEL_CONFIGS):
            missing.append("config.json")
        if not any(f.endswith((".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")) for f in files):
            missing.append("model weights (*.safetensors)")
    if "tokenizer" in needs and not files & set(TOKENIZER_FILES):
        missing.append("tokenizer files (tokenizer.json or tokenizer_config.json)")
    return missing


@dataclass(frozen=True)
class OptIn:
    """How the user says yes to a model's own code or its pickle weights, as the refusals name it.

    Every verb reads the config's model.* keys (the online verbs' --trust-remote-code / --allow-pickle are their
    aliases); the pipeline reads its train section's (train.model.*), so each refusal names the setting the user wrote.
    """

    trust_remote_code: str = "model.trust_remote_code=true"
    allow_pickle: str = "model.allow_pickle=true"


TRAIN_OPT_IN = OptIn()


def check_model_source(cfg: Config | ModelConfig, needs: tuple[str, ...] = (), opt_in: OptIn = TRAIN_OPT_IN) -> None:
    """Refuse, before any loading, a missing or incomplete local model folder, and one with custom code or only
    pickle weights (unless allowed). needs: what the caller will load from it ("model", "tokenizer")."""
    model = model_settings(cfg)
    path = os.path.expanduser(model.name_or_path)
    if not path:
        raise ModelLoadError("model.name_or_path is not set: give a local HF model folder or a hub id")
    if not os.path.isdir(path):
        if _looks_like_path(model.name_or_path):
            what = "is a file, not a folder" if os.path.exists(path) else "does not exist"
            raise ModelLoadError(
                f"model.name_or_path={model.name_or_path!r} {what}: dpokit expected a Hugging Face "
                "model folder (config.json, *.safetensors weights, tokenizer files, as save_pretrained "
                "writes them) or a hub id such as Qwen/Qwen2.5-0.5B-Instruct"
            )
        return  # a hub id: transformers itself refuses remote code, and use_safetensors refuses pickle
    missing = _missing_parts(path, needs)
    if missing:
        raise ModelLoadError(
            f"model.name_or_path={model.name_or_path!r} is a folder without {', '.join(missing)}: dpokit "
            "expected a Hugging Face model folder as save_pretrained writes it (config.json, *.safetensors "
            "weights, tokenizer files)"
        )
    if not model.trust_remote_code:
        for name in CODE_FILES:
            auto_map = _read_json(os.path.join(path, name)).get("auto_map")
            if auto_map:
                targets = ", ".join(sorted({str(v) for v in _flatten(auto_map)}))
                raise ModelLoadError(
                    f"model.name_or_path={model.name_or_path!r} ships its own Python code ({name} has an auto_map: "
                    f"{targets}); dpokit does not run code that comes with a model unless you set "
                    f"{opt_in.trust_remote_code} (only do so if you have read that code and trust its author)"
                )
    files = set(os.listdir(path))
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    pickled = sorted(f for f in files if f in PICKLE_WEIGHTS or (f.startswith("pytorch_model-") and f.endswith(".bin")))
    if pickled and not has_safetensors and not model.allow_pickle:
        raise ModelLoadError(
            f"model.name_or_path={model.name_or_path!r} has only pickle-based weights ({', '.join(pickled)}); "
            f"loading a pickle can run arbitrary code. Convert them to safetensors, or set {opt_in.allow_pickle} "
            "if you trust where the file comes from"
        )


def _read_json(path: str) -> dict:
    """A model folder's JSON file through the input gateway, {} when absent. A FIFO or a device in its place is
    refused, not read; a link is followed wherever it points (a hub cache's snapshot links to its blobs), so the
    remote-code check sees what transformers would load."""
    if not os.path.lexists(path):
        return {}
    try:
        value = read_json(path, "model_json")
    except InputError as e:
        raise ModelLoadError(str(e)) from None
    except ValueError as e:  # malformed or too deep
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
