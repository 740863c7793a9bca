"""Models for the online verbs: `demo:` names resolved, then loaded by `dpokit.models`, the one loader.

Sampling, scoring with a reward model, evaluation and the pipeline all load here, so each refuses
what `dpokit train` refuses: a model folder that ships its own code (`auto_map`) and one with
pickle-only weights, unless the user opts in. The checkpoint's own dtype is kept (`dtype: auto`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from dpokit.config import ModelConfig
from dpokit.data.records import DataError
from dpokit.demo.assets import PREFIX, demo_paths
from dpokit.models import OptIn, load_model as load_checked_model, load_tokenizer as load_checked_tokenizer


@dataclass(frozen=True)
class ModelTrust:
    """What the user allows a model to be, and where they said so (the refusal names that setting)."""

    trust_remote_code: bool = False
    allow_pickle: bool = False
    where: str = "cli"  # cli: --trust-remote-code / --allow-pickle | pipeline: its trust_remote_code / allow_pickle keys


# The online verbs opt in with their own settings, and dpokit.models' refusals name them.
OPT_IN = {
    "cli": OptIn(trust_remote_code="--trust-remote-code", allow_pickle="--allow-pickle"),
    "pipeline": OptIn(trust_remote_code="trust_remote_code=true (a pipeline key)", allow_pickle="allow_pickle=true (a pipeline key)"),
}


def resolve_model_path(spec: str) -> str:
    """`demo:sentiment-sft` (the embedded demo's SFT model, built on first use) or a folder / hub id as given."""
    if spec.startswith(PREFIX):
        paths = demo_paths()
        key = spec[len(PREFIX) :]
        if key not in paths:
            raise DataError(f"unknown demo asset {spec!r}; known: {', '.join(PREFIX + k for k in paths)}")
        return paths[key]
    return spec


def inference_settings(spec: str, trust: ModelTrust = ModelTrust(), dtype: str = "auto") -> ModelConfig:
    """The ModelConfig of a model loaded for inference: its own dtype, the user's opt-ins."""
    return ModelConfig(name_or_path=resolve_model_path(spec), dtype=dtype, trust_remote_code=trust.trust_remote_code,
                       allow_pickle=trust.allow_pickle)


def load_model(spec: str, trust: ModelTrust = ModelTrust(), auto_class=None, device: str | None = None, dtype: str = "auto"):
    """(model in eval mode, tokenizer) from a folder, hub id or demo: name; on the GPU when there is one."""
    return load_checked_model(inference_settings(spec, trust, dtype), auto_class, device, OPT_IN[trust.where])


def load_tokenizer(spec: str, trust: ModelTrust = ModelTrust()):
    """The tokenizer alone (vLLM loads the weights itself), after the same checks."""
    return load_checked_tokenizer(inference_settings(spec, trust), OPT_IN[trust.where])


def add_trust_flags(parser: argparse.ArgumentParser) -> None:
    """--trust-remote-code and --allow-pickle: for a verb's models, the opt-ins of `dpokit train`'s model.* keys."""
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the Python code a model folder ships (auto_map); only for code you have read and trust")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load pickle-based weights (pytorch_model.bin) when there are no safetensors; only from a trusted source")


def trust_from_args(args: argparse.Namespace) -> ModelTrust:
    return ModelTrust(trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)
