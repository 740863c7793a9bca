"""Models for the online verbs: `demo:` names resolved, then loaded by `dpokit.models`, the one loader.

Sampling, scoring with a reward model, evaluation and the pipeline all load here, so each refuses
what `dpokit train` refuses: a model folder that ships its own code (`auto_map`) and one with
pickle-only weights, unless the user opts in. The checkpoint's own dtype is kept (`dtype: auto`).
"""

from __future__ import annotations

from dataclasses import dataclass

from dpokit.config import ModelConfig
from dpokit.config.flags import Flag
from dpokit.data.records import DataError
from dpokit.demo.assets import resolve_demo_name
from dpokit.model_source import OptIn
from dpokit.models import load_model as load_checked_model, load_tokenizer as load_checked_tokenizer


@dataclass(frozen=True)
class ModelTrust:
    """What the user allows a model to be, and where they said so (the refusal names that setting)."""

    trust_remote_code: bool = False
    allow_pickle: bool = False
    where: str = "cli"  # cli: model.trust_remote_code / model.allow_pickle (or their flags) | pipeline: train.model.*

    @classmethod
    def of(cls, model: ModelConfig) -> "ModelTrust":
        """The opt-ins of a config's model section: the one trust switch every verb reads."""
        return cls(trust_remote_code=model.trust_remote_code, allow_pickle=model.allow_pickle)


# The refusals of dpokit.models name the setting of the verb that loaded the model.
OPT_IN = {
    "cli": OptIn(
        trust_remote_code="model.trust_remote_code=true (--trust-remote-code)",
        allow_pickle="model.allow_pickle=true (--allow-pickle)",
    ),
    "pipeline": OptIn(
        trust_remote_code="train.model.trust_remote_code=true", allow_pickle="train.model.allow_pickle=true"
    ),
}

# The online verbs' trust flags: aliases of the model.* keys `dpokit train` reads.
TRUST_FLAGS = (
    Flag(
        ("--trust-remote-code",),
        "model.trust_remote_code",
        "run the Python code a model folder ships (auto_map); only for code you have read and trust",
    ),
    Flag(
        ("--allow-pickle",),
        "model.allow_pickle",
        "load pickle-based weights (pytorch_model.bin) when there are no safetensors; only from a trusted source",
    ),
)


def resolve_model_path(spec: str) -> str:
    """`demo:sentiment-sft` (the embedded demo's SFT model, built on first use) or a folder / hub id as given."""
    return resolve_demo_name(spec, DataError)  # the one resolver of demo: names (demo/assets.py)


def inference_settings(spec: str, trust: ModelTrust = ModelTrust(), dtype: str = "auto") -> ModelConfig:
    """The ModelConfig of a model loaded for inference: its own dtype, the user's opt-ins."""
    return ModelConfig(
        name_or_path=resolve_model_path(spec),
        dtype=dtype,
        trust_remote_code=trust.trust_remote_code,
        allow_pickle=trust.allow_pickle,
    )


def load_model(
    spec: str, trust: ModelTrust = ModelTrust(), auto_class=None, device: str | None = None, dtype: str = "auto"
):
    """(model in eval mode, tokenizer) from a folder, hub id or demo: name; on the GPU when there is one."""
    return load_checked_model(inference_settings(spec, trust, dtype), auto_class, device, OPT_IN[trust.where])


def load_tokenizer(spec: str, trust: ModelTrust = ModelTrust()):
    """The tokenizer alone (vLLM loads the weights itself), after the same checks."""
    return load_checked_tokenizer(inference_settings(spec, trust), OPT_IN[trust.where])
