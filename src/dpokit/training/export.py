"""The final model of a run, with its tokenizer and model card, in out_dir/final; then, if asked, on the Hub."""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path
from typing import Optional

import huggingface_hub
from huggingface_hub import errors as hub_errors
from safetensors import SafetensorError

from dpokit.config import Config
from dpokit.models import load_policy, load_processor
from dpokit.training.checkpoint import CheckpointError, fsync_tree, is_sharded, list_checkpoints, remove_atomically
from dpokit.training.disk_space import disk_full_code, filled_up, no_space
from dpokit.training.fsdp import full_state_dict, is_fsdp
from dpokit.training.model_card import RunFacts, write_card

# What an upload raises when the Hub cannot be reached or refuses it: the HTTP library's errors (requests' are
# OSErrors; httpx's are huggingface_hub.errors.HTTPError in huggingface_hub >= 1.0), HfHubHTTPError (401, 403, ...),
# OfflineModeIsEnabled and LocalTokenNotFoundError (OSErrors), HFValidationError (a ValueError: a bad repo id).
_UPLOAD_ERRORS = (OSError, ValueError, getattr(hub_errors, "HTTPError", OSError))


def save_final(
    model, tokenizer, cfg: Config, model_dir: Path, state_dict: Optional[dict] = None, facts: Optional[RunFacts] = None
) -> None:
    """HF format that `from_pretrained` loads (full weights, a PEFT adapter, or LoRA merged), and README.md, written atomically.

    `state_dict`: the full (gathered) weights under FSDP/DeepSpeed, where `model`'s own are shards.
    `facts`: what the model card reports beyond the config (data summary, final metrics, diagnoses).
    With train.push_to_hub the folder is then uploaded; a failed upload is one line, the local model stays.
    """
    model_dir = Path(model_dir)
    tmp = model_dir.with_name(f".tmp-{model_dir.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    if cfg.lora.enabled and cfg.lora.save == "merged":
        if state_dict is not None:  # sharded: rebuild the model on CPU from the gathered weights, then merge
            model = _rebuilt(cfg, state_dict)
            state_dict = None
        model = model.merge_and_unload()
    # As for a checkpoint: its whole size free up front, and a disk that fills up anyway leaves no .tmp-final and
    # one line. The run's last checkpoint then stays the intact copy; a rerun writes final/ from it (resume.py).
    needed, free = final_bytes(model, state_dict), shutil.disk_usage(model_dir.parent).free
    if free < needed:
        raise CheckpointError(_no_space_for(model_dir, needed, free, "nothing was written"))
    try:
        model.save_pretrained(
            tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {})
        )
        tokenizer.save_pretrained(tmp)
        if (
            cfg.data.vision
        ):  # the image processor and the processor's settings, so the final folder loads with AutoProcessor
            load_processor(cfg).save_pretrained(tmp)
        write_card(cfg, facts or RunFacts(), tmp, model_dir)  # after save_pretrained: replaces PEFT's template README
        fsync_tree(tmp)
    except (OSError, SafetensorError) as e:
        code = disk_full_code(e)
        if code is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_no_space_for(model_dir, needed, free, filled_up(code))) from None
    if model_dir.exists():
        remove_atomically(model_dir) if model_dir.is_dir() else model_dir.unlink()
    os.replace(tmp, model_dir)
    if cfg.train.push_to_hub:
        print(push_to_hub(model_dir, cfg.train.push_to_hub, cfg.train.hub_private), flush=True)


def push_to_hub(model_dir: Path, repo_id: str, private: bool) -> str:
    """Upload `model_dir` to the Hub model repo `repo_id` (created if missing); returns the one line to print.

    Never raises for an unreachable or refusing Hub: the model is already saved, so the run has done its job;
    the line says what failed and the command that uploads it later.
    """
    try:
        huggingface_hub.create_repo(repo_id, private=private, exist_ok=True)
        huggingface_hub.upload_folder(
            repo_id=repo_id, folder_path=str(model_dir), commit_message="dpokit: final model and card"
        )
    except _UPLOAD_ERRORS as e:
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        private_flag = " --private" if private else ""
        return (
            f"[dpokit] train.push_to_hub: uploading to {repo_id} failed ({type(e).__name__}: {reason}); the model is saved "
            f"locally at {model_dir}; upload it later with: hf upload {repo_id} {shlex.quote(str(model_dir))}{private_flag}"
        )
    return f"[dpokit] pushed {model_dir} to https://huggingface.co/{repo_id}"


def gathered_state(accelerator, policy) -> Optional[dict]:
    """The whole model's weights when the policy is sharded (FSDP2, Accelerate's FSDP or DeepSpeed), else None: a
    collective that every process calls; the main process gets them on CPU."""
    if is_fsdp(policy):
        return full_state_dict(policy)
    return accelerator.get_state_dict(policy) if is_sharded(accelerator) else None


def final_bytes(model, state_dict: Optional[dict] = None) -> int:
    """About what final/ takes: the weights saved (an adapter's only, for a PeftModel), plus 16 MiB for tokenizer and card."""
    if state_dict is not None:
        tensors = list(state_dict.values())
    elif hasattr(model, "peft_config"):
        tensors = [p for p in model.parameters() if p.requires_grad]
    else:
        tensors = list(model.state_dict().values())
    return sum({t.data_ptr(): t.numel() * t.element_size() for t in tensors}.values()) + (16 << 20)  # tied weights once


def _no_space_for(model_dir: Path, needed: int, free: int, what_happened: str) -> str:
    checkpoints = list_checkpoints(model_dir.parent)
    if not checkpoints:
        return no_space(
            model_dir,
            needed,
            free,
            what_happened,
            "there is no checkpoint (train.save_steps=0)",
            "Free some space, then run again",
        )
    return no_space(
        model_dir,
        needed,
        free,
        what_happened,
        f"the last checkpoint {checkpoints[-1].name} is intact",
        "Free some space, then rerun the same command: it writes final/ from that checkpoint",
    )


def _rebuilt(cfg: Config, state_dict: dict):
    model = load_policy(cfg)
    model.load_state_dict(state_dict, strict=False)
    return model
