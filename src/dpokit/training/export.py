"""The final model of a run, with its tokenizer and model card, in out_dir/final; then, if asked, on the Hub."""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path
from typing import Optional

import huggingface_hub
from huggingface_hub import errors as hub_errors

from dpokit.config import Config
from dpokit.models import load_policy, load_processor
from dpokit.training.checkpoint import fsync_tree, remove_atomically
from dpokit.training.model_card import RunFacts, write_card

# What an upload raises when the Hub cannot be reached or refuses it: the HTTP library's errors (requests' are
# OSErrors; httpx's are huggingface_hub.errors.HTTPError in huggingface_hub >= 1.0), HfHubHTTPError (401, 403, ...),
# OfflineModeIsEnabled and LocalTokenNotFoundError (OSErrors), HFValidationError (a ValueError: a bad repo id).
_UPLOAD_ERRORS = (OSError, ValueError, getattr(hub_errors, "HTTPError", OSError))


def save_final(model, tokenizer, cfg: Config, model_dir: Path, state_dict: Optional[dict] = None, facts: Optional[RunFacts] = None) -> None:
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
    model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.save_pretrained(tmp)
    if cfg.data.vision:  # the image processor and the processor's settings, so the final folder loads with AutoProcessor
        load_processor(cfg).save_pretrained(tmp)
    write_card(cfg, facts or RunFacts(), tmp, model_dir)  # after save_pretrained: replaces PEFT's template README
    fsync_tree(tmp)
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
        huggingface_hub.upload_folder(repo_id=repo_id, folder_path=str(model_dir), commit_message="dpokit: final model and card")
    except _UPLOAD_ERRORS as e:
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        private_flag = " --private" if private else ""
        return (f"[dpokit] train.push_to_hub: uploading to {repo_id} failed ({type(e).__name__}: {reason}); the model is saved "
                f"locally at {model_dir}; upload it later with: hf upload {repo_id} {shlex.quote(str(model_dir))}{private_flag}")
    return f"[dpokit] pushed {model_dir} to https://huggingface.co/{repo_id}"


def _rebuilt(cfg: Config, state_dict: dict):
    model = load_policy(cfg)
    model.load_state_dict(state_dict, strict=False)
    return model
